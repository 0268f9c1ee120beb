"""hf_mfac's loggers (``"hf_mfac"`` and its children) follow the Trainer's ``--log_level``, as
transformers' do."""
from __future__ import annotations

import logging

__all__ = ["follow_log_level"]


def follow_log_level(args_or_level) -> int:
    """Set the ``"hf_mfac"`` logger to ``args.get_process_log_level()`` (``--log_level`` on the main
    process, ``--log_level_replica`` on the others; ``passive`` keeps transformers' verbosity) or to
    a given level.

    Like transformers' own loggers, ours then print without any logging set up by the script: when
    neither the root logger nor ``"hf_mfac"`` has a handler, a stderr handler is added to
    ``"hf_mfac"``. Returns the level."""
    level = (
        args_or_level.get_process_log_level()
        if hasattr(args_or_level, "get_process_log_level")
        else args_or_level
    )
    logger = logging.getLogger("hf_mfac")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        logger.addHandler(handler)
    return logger.level
