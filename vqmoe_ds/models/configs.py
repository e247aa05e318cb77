"""Model configs: one dataclass for both architectures, and the named shapes (tiny, base, large, olmoe).

`ModelConfig.moe_config(layer)` gives the `MoEConfig` of one block's FFN slot: the MoE settings for layers
chosen by ``moe_layers`` and a dense FFN (``d_inner``) for the others.

Parameter counts (`count_params`) are closed-form, so they can be checked against the built model (on the
meta device for large/olmoe) and printed before anything is allocated.  "Active per token" counts each
MoE layer's experts as k/N of their parameters (k routes per token; VQMoE's pretrain mode adds the one
discrete route, so k+1).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from ..moe.config import ConfigError, MoEConfig

MODEL_TYPES = ("gpt", "txl")



def parse_moe_layers(pattern, n_layer: int) -> List[int]:
    """Which blocks get an MoE FFN: ``all``, ``every_other`` (1, 3, 5, ...), ``none`` or a comma list."""
    p = str(pattern).strip()
    if p in ("all", "none", "every_other"):
        return {"all": list(range(n_layer)), "none": [], "every_other": list(range(1, n_layer, 2))}[p]
    try:
        ids = sorted({int(s) for s in p.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"moe_layers={p!r}: use all, every_other, none or a comma list of layer ids like 0,2"
                          ) from None
    if any(not 0 <= i < n_layer for i in ids):
        raise ConfigError(f"moe_layers={p!r} names a layer outside 0..{n_layer - 1}")
    return ids

@dataclass
class ModelConfig:
    model: str = "gpt"  # "gpt" (learned absolute positions, SDPA) or "txl" (Transformer-XL: relative positions + memory)
    vocab_size: int = 256  # token vocabulary (the pretraining driver's default: the data's)
    n_layer: int = 4  # transformer blocks
    n_head: int = 8  # attention heads
    d_model: int = 256  # model width d
    d_inner: int = 512  # dense FFN width (and the experts' width unless --expert-ffn-hidden-size is set)
    seq_len: int = 512  # GPT: context length; TXL: tgt_len (segment length)
    mem_len: int = 0  # TXL: hidden states of previous segments kept per layer (the driver's default for txl: seq_len)
    dropout: float = 0.0  # dropout on embeddings and residual branches
    attn_dropout: float = 0.0  # dropout on attention weights
    tie_embeddings: bool = True  # the output layer shares the token embedding
    moe_layers: str = "all"  # blocks with an MoE FFN: all, every_other (1, 3, 5, ...), none, or a comma list "0,2"
    expert_ffn: Optional[int] = None  # experts' hidden width; none: --ffn-hidden-size
    moe: Dict[str, Any] = field(default_factory=lambda: {"router": "topk", "num_experts": 8, "top_k": 2})  # MoEConfig fields except hidden_size / ffn_hidden_size / init_std
    init_std: float = 0.02  # standard deviation of the normal initialisation of the weights

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "n_layer": ("--num-layers",), "n_head": ("--num-attention-heads",), "d_model": ("--hidden-size",),
        "d_inner": ("--ffn-hidden-size",), "seq_len": ("--seq-length",), "expert_ffn": ("--expert-ffn-hidden-size",),
        "dropout": ("--hidden-dropout",), "attn_dropout": ("--attention-dropout",),
        "tie_embeddings": ("--tie-embeddings", "--untie-embeddings-and-output-weights=false"),
        "init_std": ("--init-method-std", "--init-std")}
    CHOICES: ClassVar[Dict[str, Tuple[str, ...]]] = {"model": MODEL_TYPES}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.model not in MODEL_TYPES:
            bad(f"unknown model {self.model!r}: choose one of {', '.join(MODEL_TYPES)} (--model)")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_inner", "seq_len"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.expert_ffn is not None and self.expert_ffn < 1:
            bad(f"expert_ffn={self.expert_ffn} must be >= 1 (or none: the dense FFN width)")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if not self.init_std > 0:
            bad(f"init_std={self.init_std} must be > 0")
        if self.d_model % self.n_head:
            bad(f"hidden size {self.d_model} is not divisible by {self.n_head} attention heads: "
                f"change --hidden-size or --num-attention-heads")
        if self.mem_len < 0:
            bad(f"mem_len={self.mem_len} must be >= 0 (--mem-len)")
        if self.model == "gpt" and self.mem_len:
            bad(f"--mem-len {self.mem_len} applies to --model txl only: drop it or use --model txl")
        self.moe_layer_ids()  # raises on a bad pattern
        self.moe_config(0)  # MoEConfig validates the MoE settings

    def moe_layer_ids(self) -> List[int]:
        return parse_moe_layers(self.moe_layers, self.n_layer)

    @property
    def is_moe(self) -> bool:
        return self.moe.get("router", "topk") != "dense" and bool(self.moe_layer_ids())

    def moe_config(self, layer: int) -> MoEConfig:
        if layer in self.moe_layer_ids() and self.moe.get("router", "topk") != "dense":
            return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=self.expert_ffn or self.d_inner,
                             init_std=self.init_std, output_init_std=self.init_std / math.sqrt(2 * self.n_layer),
                             vocab_size=self.vocab_size, **self.moe)
        return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=self.d_inner, router="dense",
                         dropout=self.moe.get("dropout", 0.0))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parameter counts (closed form) ------------------------------------------------------------------------
def routes_per_token(m: MoEConfig) -> int:
    """How many expert routes a token takes in an MoE layer (the discrete VQ path counts one)."""
    if (m.router == "vqmoe" and m.vqmoe_mode == "discrete_only") or m.router in ("hash", "cluster"):
        return 1
    if m.router == "smoe_dropout":
        return m.smoe_dropout_k_end or m.num_experts  # k at the end of its schedule
    return m.top_k + (1 if m.router == "vqmoe" else 0)


def router_params(m: MoEConfig) -> int:
    """Parameters of an MoE layer outside its routed experts (router, codebook, VQMoE's mixing gate W_g, the
    shared expert and its gate).

    Counted on the meta device from the same builders the layer uses, so every router kind is exact."""
    import torch

    from ..routers import build_router

    with torch.device("meta"):
        mods = []
        if not (m.router == "vqmoe" and m.vqmoe_mode == "discrete_only"):
            mods.append(build_router(m))
        if m.router == "vqmoe":
            mods.append(build_router(m, "vq"))
            if m.vqmoe_mode == "pretrain" and m.router == "vqmoe":
                mods.append(torch.nn.Linear(m.hidden_size, 2))
        if m.shared_expert_size:
            D, S = m.hidden_size, m.shared_expert_size
            mods += [torch.nn.Linear(D, S), torch.nn.Linear(S, D)]
            if m.shared_expert_mode != "add":
                mods.append(torch.nn.Linear(D, 1 if m.shared_expert_mode == "gate" else 2))
    return sum(p.numel() for mod in mods for p in mod.parameters())


def count_params(cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "active", "experts", "non_expert", "embedding"} of the whole model (all N experts, as with
    ep_size=1; a rank of an expert-parallel run holds N/ep of them).

    Experts are ``fc1 (D x F + F) + fc2 (F x D + D)`` each; "active" counts ``routes_per_token`` of them.
    """
    D, F, L, V = cfg.d_model, cfg.d_inner, cfg.n_layer, cfg.vocab_size
    ln = 2 * D
    if cfg.model == "gpt":
        attn = D * 3 * D + 3 * D + D * D + D  # fused QKV (bias) + out proj (bias)
        emb = V * D + cfg.seq_len * D  # tokens + learned positions
    else:
        H, Dh = cfg.n_head, D // cfg.n_head
        attn = D * 3 * D + D * D + D * D + 2 * H * Dh  # fused QKV, r_net, o_net (no biases) + u, v
        emb = V * D
    head = 0 if cfg.tie_embeddings else V * D  # untied output layer (no bias)
    dense_ffn = D * F + F + F * D + D
    experts = active_experts = dense = 0
    for i in range(L):
        m = cfg.moe_config(i)
        if m.router == "dense":
            dense += dense_ffn
        else:
            one = D * m.ffn_hidden_size + m.ffn_hidden_size + m.ffn_hidden_size * D + D
            experts += m.num_experts * one
            active_experts += routes_per_token(m) * one
            dense += router_params(m)
    non_expert = emb + head + L * (attn + 2 * ln) + dense + ln  # + final LayerNorm
    return {"total": non_expert + experts, "active": non_expert + active_experts, "experts": experts,
            "non_expert": non_expert, "embedding": emb + head}


# ---- named shapes ------------------------------------------------------------------------------------------
NAMED: Dict[str, Dict[str, Any]] = {
    # CPU tests and the demo: seconds per run on 2 cores
    "tiny": dict(n_layer=2, n_head=4, d_model=64, d_inner=128, seq_len=64, vocab_size=256,
                 moe={"router": "vqmoe", "num_experts": 4, "top_k": 2, "codebook_size": 8}),
    # the paper's base (VQMoE, enwik8/text8 rows): 4 MoE blocks, d 256, 8 heads, d_inner 512, 16 experts
    "base": dict(n_layer=4, n_head=8, d_model=256, d_inner=512, seq_len=512, vocab_size=256,
                 moe={"router": "vqmoe", "num_experts": 16, "top_k": 2, "codebook_size": 16}),
    # the paper's large: 12 MoE blocks, d 512, 8 heads, expert width 1024, 16 experts (~215M with byte vocab)
    "large": dict(n_layer=12, n_head=8, d_model=512, d_inner=1024, seq_len=512, vocab_size=256,
                  moe={"router": "vqmoe", "num_experts": 16, "top_k": 2, "codebook_size": 16}),
    # OLMoE-1B-7B's shape (16 layers, d 2048, 16 heads, 64 experts of width 1024, top-8, vocab 50304, untied).
    # Our experts are GELU MLPs (2 matrices), OLMoE's are SwiGLU (3): expert parameters are 2/3 of OLMoE's.
    "olmoe": dict(n_layer=16, n_head=16, d_model=2048, d_inner=1024, seq_len=4096, vocab_size=50304,
                  tie_embeddings=False, moe={"router": "topk", "num_experts": 64, "top_k": 8}),
}


def named_config(name: str, **overrides) -> ModelConfig:
    if name not in NAMED:
        raise ConfigError(f"unknown config {name!r}: choose one of {', '.join(NAMED)} (--config)")
    kw = dict(NAMED[name])
    moe = dict(kw.pop("moe"))
    moe.update(overrides.pop("moe", {}) or {})
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(moe=moe, **kw)
