"""The math of hf_mfac: tensors in, tensors out. Imports torch and hf_mfac.kernels only."""
from .fisher import BlockFisherInverse, relative_damp
from .ihvp import DynamicMFAC, GradientRejected
from .sparse_window import CompressedMFAC
from .static_mfac import StaticMFAC

__all__ = ["DynamicMFAC", "CompressedMFAC", "StaticMFAC", "BlockFisherInverse", "GradientRejected",
           "relative_damp"]
