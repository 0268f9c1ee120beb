"""Saving and restoring the sharded M-FAC window with ``transformers.Trainer`` checkpoints.

The Trainer writes ``optimizer.state_dict()`` from the main process only. With
:class:`~hf_mfac.optim.distributed.ShardedMFAC` that state is the same on every rank except the
gradient window, which each rank holds a part of; :class:`MFACShardCheckpointCallback` writes that
part next to it, ``checkpoint-N/mfac_shard_{rank}.pt``, and reads it back when training resumes
(with any number of ranks).

```python
from hf_mfac.optim.distributed import ShardedMFAC
from hf_mfac.integrations import mfac_optimizer_cls_and_kwargs
from hf_mfac.integrations.trainer.shards import MFACShardCheckpointCallback

_, kwargs = mfac_optimizer_cls_and_kwargs(args) trainer = Trainer(model=model, args=args,
train_dataset=ds, optimizer_cls_and_kwargs=(ShardedMFAC, kwargs),
                  callbacks=[MFACShardCheckpointCallback()])
trainer.train(resume_from_checkpoint=True)  # run with: torchrun --nproc_per_node=4 train.py ...
```
"""
from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from ...optim import unwrap_optimizer
from ...optim.distributed import ShardedMFAC, load_mfac_shards, save_mfac_shards, shard_file

__all__ = ["MFACShardCheckpointCallback"]

logger = logging.getLogger("hf_mfac")


class MFACShardCheckpointCallback(TrainerCallback):
    """Write each rank's M-FAC window shard into every checkpoint and restore it on resume.

    ``on_save``: ``<output_dir>/checkpoint-<global_step>/mfac_shard_{rank}.pt`` on every rank
    (skipped with ``save_only_model``). ``on_train_begin`` of a resumed run (``global_step > 0``):
    loads the shards from ``resume_from_checkpoint`` if given here, else from
    ``args.resume_from_checkpoint`` when it is a folder, else from
    ``<output_dir>/checkpoint-<global_step>`` (what ``train(resume_from_checkpoint=True)`` picks);
    the number of ranks may differ from the saving run. Without shards there: ``strict=True``
    raises, ``strict=False`` warns and starts with an empty window. Does nothing for other
    optimizers.
    """

    def __init__(self, resume_from_checkpoint: str | None = None, strict: bool = True):
        self.resume_from_checkpoint = resume_from_checkpoint
        self.strict = strict

    @staticmethod
    def _sharded(optimizer):
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        return opt if isinstance(opt, ShardedMFAC) else None

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        opt = self._sharded(optimizer)
        if opt is None or getattr(args, "save_only_model", False):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_mfac_shards(opt, folder, global_step=state.global_step)

    def _folder(self, args, state) -> str:
        if self.resume_from_checkpoint:
            return self.resume_from_checkpoint
        given = getattr(args, "resume_from_checkpoint", None)
        if isinstance(given, str) and os.path.isdir(given):
            return given
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = self._sharded(optimizer)
        if opt is None or state.global_step == 0:
            return
        folder = self._folder(args, state)
        error = None
        try:
            if any(os.path.isfile(shard_file(folder, r)) for r in (opt.comm.rank, 0)):
                load_mfac_shards(opt, folder, expect_meta={"global_step": state.global_step})
            else:
                msg = (f"resuming at step {state.global_step} but {folder} has no M-FAC window "
                       "shards "
                       "(mfac_shard_*.pt); pass "
                       "MFACShardCheckpointCallback(resume_from_checkpoint=<folder>)")
                if self.strict:
                    raise FileNotFoundError(msg + ", or strict=False to start with an empty window")
                logger.warning("%s; the M-FAC window starts empty", msg)
        except Exception as e:  # noqa: BLE001 - every rank raises, none is left waiting in the first all-reduce
            error = e
        opt.comm.check(error)
