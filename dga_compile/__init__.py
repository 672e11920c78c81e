"""dga-compile: rewrite the attention of PyTorch models into Dynamic Group Attention (DGA)."""

from .api import dynamic_group_attention
from .config import DGAConfig
from .reference import reference_attention

__all__ = ["DGAConfig", "dynamic_group_attention", "reference_attention"]
__version__ = "0.1.0"
