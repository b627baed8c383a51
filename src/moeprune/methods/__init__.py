"""Pruning methods: each module registers its methods in moeprune.methods.registry when imported."""

from . import diverse, hcsmoe, msmoe, naee, selection  # noqa: F401  (registers the methods)
from .registry import METHODS, Method, NoOptions, check_choices, get_method, register

__all__ = ["METHODS", "Method", "NoOptions", "check_choices", "get_method", "register"]
