"""The MoE layer and its parts: config, dispatch, DeepSpeed's expert container, layer."""
from .config import ConfigError, MoEConfig
from .dispatch import RouteGrid, SortedDispatch, capacity_for, plan_routes
from .layer import DenseFFN, ExpertMLP, MoELayer, build_ffn

__all__ = ["MoEConfig", "ConfigError", "MoELayer", "DenseFFN", "ExpertMLP", "build_ffn",
           "RouteGrid", "SortedDispatch", "capacity_for", "plan_routes"]
