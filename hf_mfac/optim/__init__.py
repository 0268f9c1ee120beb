from .distributed import ShardedMFAC
from .mfac import MFAC, window_bytes

__all__ = ["MFAC", "ShardedMFAC", "window_bytes"]
