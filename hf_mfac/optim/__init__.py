"""The M-FAC optimizer [M-FAC]: :class:`MFAC` (one process) and :class:`ShardedMFAC` (the gradient window
split across processes), with the helpers that Trainer integration uses to recognise and size it."""
from .distributed import ShardedMFAC
from .mfac import MFAC, MFAC_OPTIM, is_mfac_optimizer, selects_mfac, unwrap_optimizer, window_bytes

__all__ = ["MFAC", "ShardedMFAC", "window_bytes", "MFAC_OPTIM", "is_mfac_optimizer", "selects_mfac",
           "unwrap_optimizer"]
