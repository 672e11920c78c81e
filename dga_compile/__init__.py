"""dga-compile: rewrite the attention of PyTorch models into Dynamic Group Attention (DGA)."""

from .api import dynamic_group_attention
from .config import DGAConfig
from .plan import Plan
from .reference import reference_attention
from .passes import RewriteError, RewriteReport, rewrite
from .backend import backend, compile

__all__ = ["DGACache", "DGAConfig", "Plan", "RewriteError", "RewriteReport", "backend", "compile", "dynamic_group_attention",
           "reference_attention", "rewrite"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`DGACache` needs transformers: it is imported on first use, not by ``import dga_compile``."""
    if name == "DGACache":
        from .cache import DGACache
        return DGACache
    raise AttributeError(f"module 'dga_compile' has no attribute {name!r}")
