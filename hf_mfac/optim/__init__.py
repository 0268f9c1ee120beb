"""The M-FAC optimizer [M-FAC]: :class:`MFAC` (one process) and :class:`ShardedMFAC` (the gradient
window split across processes), its options defined once (:class:`MFACOptions`), and the helpers
that Trainer integration uses to recognise and size it."""
from .distributed import ShardedMFAC
from .mfac import MFAC, MFAC_OPTIM, is_mfac_optimizer, selects_mfac, unwrap_optimizer, window_bytes
from .options import MFACOptions, parse_optim_args

__all__ = ["MFAC", "ShardedMFAC", "MFACOptions", "parse_optim_args", "window_bytes", "MFAC_OPTIM",
           "is_mfac_optimizer", "selects_mfac", "unwrap_optimizer"]
