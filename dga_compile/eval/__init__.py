"""Accuracy evaluation: DGA vs dense and equal-cost baselines on real models and text."""

from .cost import Cost, CostMeter
from .methods import Method
from .run import EvalResult, MethodResult, evaluate

__all__ = ["Cost", "CostMeter", "EvalResult", "Method", "MethodResult", "evaluate"]
