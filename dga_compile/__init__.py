"""dga-compile: rewrite the attention of PyTorch models into Dynamic Group Attention (DGA)."""

from .api import dynamic_group_attention
from .config import DGAConfig
from .reference import reference_attention
from .passes import RewriteError, RewriteReport, rewrite
from .backend import backend, compile

__all__ = ["DGAConfig", "RewriteError", "RewriteReport", "backend", "compile", "dynamic_group_attention",
           "reference_attention", "rewrite"]
__version__ = "0.1.0"
