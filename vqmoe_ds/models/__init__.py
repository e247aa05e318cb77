"""Language models with MoE / VQMoE feed-forward layers: GPT and Transformer-XL, and their named configs."""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from .common import estimate_mfu, flops_per_token, moe_layers, moe_stats, param_report
from .configs import NAMED, ModelConfig, count_params, named_config, routes_per_token
from .gpt import GPT
from .transformer_xl import TransformerXL, rel_shift


def build_model(cfg: ModelConfig, device=None):
    """The model of ``cfg``; ``device="meta"`` builds it without memory (shapes and counts only)."""
    if str(device) == "meta":
        with MetaInit():
            return build_model(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return GPT(cfg) if cfg.model == "gpt" else TransformerXL(cfg)


class MetaInit(TorchFunctionMode):
    """Like ``with torch.device("meta")``, except that ``torch.randint`` stays on the CPU: `MoELayer` draws
    its expert seed with ``torch.randint(...).item()``, which a meta tensor cannot answer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None and func is not torch.randint:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


__all__ = ["ModelConfig", "NAMED", "named_config", "count_params", "routes_per_token", "GPT", "TransformerXL",
           "rel_shift", "build_model", "flops_per_token", "estimate_mfu", "param_report", "moe_layers", "moe_stats"]
