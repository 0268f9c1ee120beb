"""hf_mfac: second-order optimization and pruning for the Hugging Face training stack.

``import hf_mfac`` imports torch and the math core only: it compiles nothing, initialises no CUDA,
changes no global flag, prints nothing and does not import transformers (``hf_mfac.integrations``
does, lazily).
"""
__version__ = "0.1.0"

from . import core
from .optim import MFAC

__all__ = ["MFAC", "core", "__version__"]
