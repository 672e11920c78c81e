"""Accuracy evaluation: DGA vs dense and equal-cost baselines on real models and text."""

from .methods import CostMeter, Method
from .run import EvalResult, MethodResult, evaluate

__all__ = ["CostMeter", "EvalResult", "Method", "MethodResult", "evaluate"]
