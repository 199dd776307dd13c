"""Pruning methods: how each step of the pipeline decides which channels or blocks go.

- :mod:`.base`: the :class:`Method` protocol, its :class:`Option` data, the registry and
  :class:`CriterionMethod` (a criterion such as ``l1`` plus a budget: the baselines).
- :mod:`.heuristic`: METHODS.md method 1, a per-layer estimator picks the filters.
- :mod:`.dlp`: method 2, PLS-VIP scores remove whole residual blocks (``dlp``), then filters
  (``dlp+filters``).
- :mod:`.gates`: per-channel gates shared by methods 3 and 4.
- :mod:`.hfp`: method 3, a differentiable MACs/params loss on the gates.
- :mod:`.importance`: method 4, learned per-channel weights, then steps within a tolerance.

Importing this package registers every method.
"""
from .base import (CriterionMethod, Decision, Method, Option, StepContext, get_method, list_methods, method_class,
                   register_method)
from ..depth import LayerPlan  # was defined here; re-exported for one release
from .dlp import CascadeMethod, LayerPruningMethod
from .gates import ChannelScales
from .heuristic import HeuristicMethod, list_estimators, register_estimator
from .hfp import HFPMethod, HFPRegularizer
from .importance import ImportanceWeightMethod, ImportanceWeights, channel_macs

__all__ = ["Method", "Option", "StepContext", "Decision", "CriterionMethod", "HeuristicMethod", "LayerPruningMethod",
           "CascadeMethod", "LayerPlan", "HFPMethod", "HFPRegularizer", "ChannelScales", "ImportanceWeights", "ImportanceWeightMethod",
           "channel_macs", "get_method", "register_method", "list_methods", "method_class", "register_estimator",
           "list_estimators"]
