"""Routers behind one interface (`Router.forward(x_TD, ids_T=None) -> Routing`): top-k SMoE, XMoE, StableMoE,
SMoE-Dropout, VQ, and the discrete baselines hash routing and the clustering router.  `build_router(cfg)` makes
the one a `MoEConfig` names."""
from .base import Router, Routing, balance_loss, set_step
from .cluster import ClusterRouter
from .hash import HashRouter, balanced_table, fit_hash_tables
from .smoe_dropout import SMoEDropoutRouter
from .stablemoe import StableMoERouter
from .topk import TopKOptions, TopKRouter, update_expert_biases
from .vq import VQRouter
from .xmoe import XMoERouter


def build_router(cfg, kind: str = None):
    """The continuous router of `cfg` (kind defaults to cfg.router; "vqmoe"'s continuous path is top-k)."""
    kind = kind or cfg.router
    d, n = cfg.hidden_size, cfg.num_experts
    norm = cfg.norm_topk_prob
    opts = TopKOptions(normalize=norm, top1_weight=cfg.top1_weight, score_function=cfg.score_function,
                       scaling=cfg.topk_scaling_factor, balancing=cfg.load_balancing_type, z_loss_coef=cfg.z_loss_coef,
                       expert_bias=cfg.expert_bias, bias_update_rate=cfg.bias_update_rate,
                       force_balance=cfg.force_load_balancing)
    if kind in ("topk", "vqmoe"):
        return TopKRouter(d, n, cfg.top_k, cfg.balance_loss_coef, cfg.router_jitter, normalize=norm, options=opts)
    if kind == "xmoe":
        return XMoERouter(d, n, cfg.top_k, cfg.xmoe_dim, cfg.xmoe_init_temperature, cfg.balance_loss_coef, norm, opts)
    if kind == "stablemoe":
        return StableMoERouter(d, n, cfg.top_k, cfg.stablemoe_stage1_steps, cfg.stablemoe_distill_dim,
                               cfg.stablemoe_distill_coef, cfg.balance_loss_coef, norm, opts)
    if kind == "smoe_dropout":
        opts.balancing = "none"  # a frozen router: nothing could act on a balance loss
        return SMoEDropoutRouter(d, n, cfg.smoe_dropout_k_start, cfg.smoe_dropout_k_end, cfg.smoe_dropout_k_steps,
                                 norm, opts)
    if kind == "hash":
        return HashRouter(cfg.vocab_size, n, cfg.hash_table, cfg.hash_seed)
    if kind == "cluster":
        return ClusterRouter(d, n, cfg.cluster_warmup_steps, cfg.cluster_distance)
    if kind == "vq":
        from ..quantizers import build_quantizer

        return VQRouter(build_quantizer(cfg), n, cfg.vq_alpha)
    raise ValueError(f"unknown router {kind!r}")


__all__ = ["Router", "Routing", "balance_loss", "set_step", "build_router", "TopKRouter", "XMoERouter",
           "StableMoERouter", "SMoEDropoutRouter", "VQRouter", "HashRouter", "ClusterRouter", "balanced_table",
           "fit_hash_tables", "TopKOptions", "update_expert_biases"]
