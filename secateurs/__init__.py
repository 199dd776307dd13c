"""secateurs: structured pruning that hands back a physically smaller dense model."""
from ._validation import PruningError
from .cost import Cost, LayerCost, PlanCost, count
from .latency import measure_latency, time_models
from .criteria import get_criterion, group_scores, list_criteria, register_criterion
from .export import export_onnx
from .saving import load, save
from .graph import ChannelGroup, DependencyGraph, analyze
from .methods import (CriterionMethod, HeuristicMethod, HFPMethod, HFPRegularizer, ImportanceWeightMethod,
                      ImportanceWeights, Method, get_method, list_methods, register_method)
from .budget import Allocator, Budget, plan_for_budget, uniform_plan
from .pipeline import prune
from .surgery import PruningPlan, apply_plan, zero_channels

__version__ = "0.1.0"
__all__ = [
    "analyze", "prune", "count", "apply_plan", "zero_channels", "PruningPlan", "DependencyGraph",
    "ChannelGroup", "Cost", "LayerCost", "PruningError", "get_criterion", "group_scores",
    "list_criteria", "register_criterion", "uniform_plan", "Allocator", "Budget", "plan_for_budget", "PlanCost",
    "measure_latency", "time_models", "save", "load", "export_onnx", "Method", "CriterionMethod", "HeuristicMethod", "get_method",
    "list_methods", "register_method", "HFPMethod", "HFPRegularizer", "ImportanceWeights",
    "ImportanceWeightMethod",
]
