from .distributed import ShardedMFAC
from .mfac import MFAC, MFAC_OPTIM, is_mfac_optimizer, selects_mfac, unwrap_optimizer, window_bytes

__all__ = ["MFAC", "ShardedMFAC", "window_bytes", "MFAC_OPTIM", "is_mfac_optimizer", "selects_mfac",
           "unwrap_optimizer"]
