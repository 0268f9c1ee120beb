"""The math of hf_mfac: tensors in, tensors out. Imports torch and hf_mfac.kernels only."""
from .fisher import BlockFisherInverse
from .ihvp import DynamicMFAC, StaticMFAC

__all__ = ["DynamicMFAC", "StaticMFAC", "BlockFisherInverse"]
