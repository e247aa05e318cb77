"""ViT with MoE / VQMoE / SoftMoE feed-forward layers (pre-LayerNorm, fused QKV, bidirectional SDPA).

    images_BCHW -> strided conv (patches) -> [+ class token] + positions -> [Block] x n_layer
                -> LayerNorm -> class token or mean over patches -> head -> logits_BK

A block is two residual lines, as in models/gpt.py; its FFN slot is a dense MLP or an MoE layer with any
router of the library (``MoEConfig(...).build()``), or a `SoftMoE` (router ``"soft"``), all called as
``y, aux = ffn(x_BND)``.  The loss that is back-propagated is the cross-entropy plus the summed aux losses.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..fields import setting
from ..models.common import init_weights
from ..models.configs import parse_moe_layers, routes_per_token, router_params
from ..moe.config import ConfigError, MoEConfig
from .soft_moe import SoftMoE, SoftMoEConfig

Pool = Literal["cls", "mean"]
POOLS = typing.get_args(Pool)


@dataclass
class ViTConfig:
    image_size: int = setting(32, "input side in pixels")
    patch_size: int = setting(4, "patch side in pixels")
    in_chans: int = setting(3, "image channels (set by the data)")
    num_classes: int = setting(10, "output classes (set by the data)")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(8, "attention heads")
    d_model: int = setting(256, "model width d")
    d_inner: int = setting(512, "dense FFN width (and the experts' unless --expert-ffn-hidden-size is set)")
    pool: Pool = setting("cls", '"cls": a learned class token; "mean": average of the patch tokens')
    dropout: float = setting(0.0, "dropout on embeddings and residual branches")
    attn_dropout: float = setting(0.0, "dropout on attention weights")
    moe_layers: str = setting("every_other", "blocks with an MoE FFN: all, every_other (1, 3, ...), none, or a comma "
                                             'list "0,2"')
    expert_ffn: Optional[int] = setting(None, "experts' hidden width; none: --ffn-hidden-size")
    # a dict, not a MoEConfig: it also holds SoftMoE's settings (router "soft", "slots_per_expert", "normalize"),
    # which are no MoEConfig fields; ffn_config turns it into the MoEConfig or SoftMoEConfig of a layer
    moe: Dict[str, Any] = setting(factory=lambda: {"router": "vqmoe", "num_experts": 8, "top_k": 2, "codebook_size": 16},
                                  help='MoEConfig fields except hidden/ffn sizes; router "soft" = SoftMoE, with '
                                       '"slots_per_expert" and "normalize"')
    init_std: float = setting(0.02, "standard deviation of the normal initialisation of the weights")

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "n_layer": ("--num-layers",), "n_head": ("--num-attention-heads",), "d_model": ("--hidden-size",),
        "d_inner": ("--ffn-hidden-size",), "expert_ffn": ("--expert-ffn-hidden-size",),
        "dropout": ("--hidden-dropout",), "attn_dropout": ("--attention-dropout",),
        "init_std": ("--init-method-std", "--init-std")}

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(msg)

        for name in ("image_size", "patch_size", "in_chans", "num_classes", "n_layer", "n_head", "d_model", "d_inner"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.image_size % self.patch_size:
            bad(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}: "
                f"change --image-size or --patch-size")
        if self.d_model % self.n_head:
            bad(f"hidden size {self.d_model} is not divisible by {self.n_head} attention heads: "
                f"change --hidden-size or --num-attention-heads")
        if self.router == "hash":
            bad("router hash sends each token id to a fixed expert, and image patches have no ids: choose another "
                "router")
        if self.pool not in POOLS:
            bad(f"unknown pool {self.pool!r}: choose one of {', '.join(POOLS)} (--pool)")
        self.moe_layer_ids()
        self.ffn_config(0)  # MoEConfig / SoftMoEConfig check the MoE settings

    @property
    def output_init_std(self) -> float:
        """The depth-scaled std of every residual branch's output projection (GPT-2)."""
        return self.init_std / math.sqrt(2 * self.n_layer)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pool == "cls")

    @property
    def router(self) -> str:
        return self.moe.get("router", "topk")

    @property
    def is_moe(self) -> bool:
        return self.router != "dense" and bool(self.moe_layer_ids())

    @property
    def ep_size(self) -> int:
        return int(self.moe.get("ep_size", 1))

    def moe_layer_ids(self) -> List[int]:
        return parse_moe_layers(self.moe_layers, self.n_layer)

    def ffn_config(self, layer: int):
        """MoEConfig (dense, or MoE with any router) or SoftMoEConfig of block ``layer``'s FFN slot."""
        if layer not in self.moe_layer_ids() or self.router == "dense":
            return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=self.d_inner, router="dense",
                             dropout=self.moe.get("dropout", 0.0))
        width = self.expert_ffn or self.d_inner
        if self.router == "soft":
            kw = {k: v for k, v in self.moe.items() if k in {f.name for f in dataclasses.fields(SoftMoEConfig)}}
            extra = set(self.moe) - set(kw) - {"router"}
            if extra:
                raise ConfigError(f"SoftMoE takes no {', '.join(sorted(extra))}: drop those MoE flags for router soft")
            return SoftMoEConfig(hidden_size=self.d_model, ffn_hidden_size=width, init_std=self.init_std,
                                 output_init_std=self.output_init_std, **kw)
        if "slots_per_expert" in self.moe or "normalize" in self.moe:
            raise ConfigError(f"slots per expert / normalize apply to router soft only, not {self.router!r}: "
                              f"drop --soft-slots or use --router soft")
        return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=width, init_std=self.init_std,
                         output_init_std=self.output_init_std, **self.moe)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


NAMED: Dict[str, Dict[str, Any]] = {
    # CPU tests and the synthetic comparison: 16x16 images, 4x4 patches, 16 patch tokens
    "tiny": dict(image_size=16, patch_size=4, n_layer=2, n_head=4, d_model=64, d_inner=128, moe_layers="all",
                 moe={"router": "vqmoe", "num_experts": 4, "top_k": 2, "codebook_size": 8}),
    # CIFAR-size: 32x32, 4x4 patches (64 tokens + class token), 6 blocks, MoE in every other block (~10M)
    "small": dict(image_size=32, patch_size=4, n_layer=6, n_head=8, d_model=256, d_inner=512, expert_ffn=640,
                  moe_layers="every_other",
                  moe={"router": "vqmoe", "num_experts": 8, "top_k": 2, "codebook_size": 16}),
    # ImageNet-size: ViT-B/16's trunk width at d 512 (196 patches), 12 blocks, 8 experts in every other (~110M)
    "large": dict(image_size=224, patch_size=16, n_layer=12, n_head=8, d_model=512, d_inner=2048,
                  expert_ffn=1728, moe_layers="every_other",
                  moe={"router": "vqmoe", "num_experts": 8, "top_k": 2, "codebook_size": 16}),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """The named shape with ``overrides`` on top (None values ignored; ``moe`` merged key by key).  For router
    "soft" only the shape's ``num_experts`` is kept: its top-k / codebook settings mean nothing to SoftMoE."""
    if name not in NAMED:
        raise ConfigError(f"unknown config {name!r}: choose one of {', '.join(NAMED)} (--config)")
    kw = dict(NAMED[name])
    base, given = dict(kw.pop("moe")), dict(overrides.pop("moe", None) or {})
    if given.get("router", base.get("router")) == "soft":
        base = {k: v for k, v in base.items() if k == "num_experts"}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(moe={**base, **given}, **kw)


def count_params(cfg: ViTConfig) -> Dict[str, int]:
    """{"total", "active", "experts", "non_expert"} in closed form (all N experts, as at ep_size=1).

    "active": parameters a token's output depends on -- k (+1 VQ) routed experts of an MoE layer, but *all*
    experts of a SoftMoE layer (every slot output reaches every token)."""
    D, K, L = cfg.d_model, cfg.num_classes, cfg.n_layer
    patch = cfg.in_chans * cfg.patch_size ** 2 * D + D
    emb = patch + cfg.num_tokens * D + (D if cfg.pool == "cls" else 0)
    attn = D * 3 * D + 3 * D + D * D + D
    non_expert = emb + L * (attn + 4 * D) + 2 * D + D * K + K
    experts = active = 0
    for i in range(L):
        m = cfg.ffn_config(i)
        if isinstance(m, MoEConfig) and m.router == "dense":
            non_expert += 2 * D * m.ffn_hidden_size + m.ffn_hidden_size + D
            continue
        one = 2 * D * m.ffn_hidden_size + m.ffn_hidden_size + D
        experts += m.num_experts * one
        if isinstance(m, SoftMoEConfig):
            non_expert += D * m.num_experts * m.slots_per_expert + int(m.normalize)
            active += m.num_experts * one
        else:
            non_expert += router_params(m)
            active += routes_per_token(m) * one
    return {"total": non_expert + experts, "active": non_expert + active, "experts": experts,
            "non_expert": non_expert}


class SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.attn_dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BND):
        B, N, D = x_BND.shape
        q, k, v = self.c_attn(x_BND).split(D, dim=2)
        q_BHNd, k_BHNd, v_BHNd = (t.view(B, N, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y_BHNd = F.scaled_dot_product_attention(q_BHNd, k_BHNd, v_BHNd,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y_BHNd.transpose(1, 2).reshape(B, N, D)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ffn = cfg.ffn_config(layer).build()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BND):
        x_BND = x_BND + self.attn(self.ln1(x_BND))
        y_BND, aux = self.ffn(self.ln2(x_BND))
        return x_BND + self.drop(y_BND), aux


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.num_tokens, D) * cfg.init_std)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.num_classes)
        init_weights(self, cfg.init_std, cfg.n_layer)  # skips MoELayer internals; SoftMoE's experts are redone:
        for m in self.modules():
            if isinstance(m, SoftMoE):
                m.reset_experts(int(torch.randint(0, 2**31 - 1, ()).item()))
        if not self.head.weight.is_meta:
            nn.init.zeros_(self.head.weight)  # ViT: a zero head starts every class at the same logit

    def forward(self, images_BCHW, targets_B=None):
        """(logits_BK, loss, aux): loss = mean cross-entropy (None without targets), aux = the summed, already
        weighted auxiliary losses of the MoE layers."""
        C, H, W = images_BCHW.shape[1:]
        if (C, H, W) != (self.cfg.in_chans, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"images of shape {C}x{H}x{W}, the model expects {self.cfg.in_chans}x"
                             f"{self.cfg.image_size}x{self.cfg.image_size}: set --image-size / resize the data")
        x_BND = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        x_BND = self.drop(x_BND + self.pos_emb)
        aux = x_BND.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x_BND, a = block(x_BND)
            aux = aux + a
        x_BND = self.ln_f(x_BND)
        pooled_BD = x_BND[:, 0] if self.cls_token is not None else x_BND.mean(dim=1)
        logits_BK = self.head(pooled_BD)
        loss = None if targets_B is None else F.cross_entropy(logits_BK.float(), targets_B)
        return logits_BK, loss, aux


def build_vit(cfg: ViTConfig, device=None) -> ViT:
    """The model of ``cfg``; ``device="meta"`` builds it without memory (shapes and counts only)."""
    if str(device) == "meta":
        from ..models import MetaInit

        with MetaInit():
            return ViT(cfg)
    return ViT(cfg)


def moe_ffn_layers(model: nn.Module) -> list:
    """The MoE-type FFN slots (MoELayer, SoftMoE) of ``model`` in depth order: the ones with stats()."""
    from ..moe import MoELayer

    return [m for m in model.modules() if isinstance(m, (MoELayer, SoftMoE))]
