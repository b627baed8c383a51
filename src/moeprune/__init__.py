"""moeprune: task-agnostic expert pruning and merging for Mixture-of-Experts language models."""

from .api import PruneConfig, PruneResult, model_info, prune
from .arch import FAMILIES, MoePruneError, moe_layout
from .calibration import collect
from .text import calibration_tokens
from .checkpoint import load
from .methods import METHODS, get_method
from .plan import LayerPlan, Plan
from .selfcalib import calibration_windows
from .stats import LayerStats, Stats
from .surgery import apply_plan

__version__ = "0.1.0"
__all__ = ["FAMILIES", "METHODS", "LayerPlan", "LayerStats", "MoePruneError", "Plan", "PruneConfig", "PruneResult",
           "Stats", "apply_plan", "calibration_tokens", "calibration_windows", "collect", "get_method", "load", "model_info", "moe_layout",
           "prune"]
