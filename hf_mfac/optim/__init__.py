from .mfac import MFAC

__all__ = ["MFAC"]
