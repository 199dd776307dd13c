"""secateurs: structured pruning that hands back a physically smaller dense model."""
from ._validation import PruningError
from .api import prune, uniform_plan
from .cost import Cost, LayerCost, count
from .criteria import get_criterion, group_scores, list_criteria, register_criterion
from .graph import ChannelGroup, DependencyGraph, analyze
from .surgery import PruningPlan, apply_plan, zero_channels

__version__ = "0.1.0"
__all__ = [
    "analyze", "prune", "count", "apply_plan", "zero_channels", "PruningPlan", "DependencyGraph",
    "ChannelGroup", "Cost", "LayerCost", "PruningError", "get_criterion", "group_scores",
    "list_criteria", "register_criterion", "uniform_plan",
]
