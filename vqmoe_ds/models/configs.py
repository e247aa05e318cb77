"""Model configs: one dataclass for both architectures, and the named shapes (tiny, base, large, olmoe,
olmoe-1b-7b).

`ModelConfig.moe` holds the model's MoE settings (a `MoEConfig` without layer sizes);
`ModelConfig.moe_config(layer)` gives the `MoEConfig` of one block's FFN slot: the MoE settings with the model's
sizes filled in for layers chosen by ``moe_layers``, and a dense FFN (``d_inner``) for the others.  `to_dict` /
`from_dict` are the JSON records of checkpoints and exports (``moe``: the given settings, `MoEConfig.settings`).

Parameter counts (`count_params`) are closed-form, so they can be checked against the built model (on the
meta device for large/olmoe) and printed before anything is allocated.  "Active per token" counts each
MoE layer's experts as k/N of their parameters (k routes per token; VQMoE's pretrain mode adds the one
discrete route, so k+1).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple

from ..fields import setting
from ..moe.config import ConfigError, MoEConfig

ModelType = Literal["gpt", "txl"]
MODEL_TYPES = typing.get_args(ModelType)
Normalization = Literal["LayerNorm", "RMSNorm"]
NORMALIZATIONS = typing.get_args(Normalization)
PositionEmbedding = Literal["learned_absolute", "rope"]
POSITION_EMBEDDINGS = typing.get_args(PositionEmbedding)
QKNorm = Literal["none", "head", "hidden"]
QK_NORMS = typing.get_args(QKNorm)
# the fields that shape the GPT block only (Transformer-XL keeps its LayerNorm / GELU / relative-position block)
GPT_BLOCK_FIELDS = ("normalization", "norm_epsilon", "swiglu", "position_embedding_type", "rotary_base", "qk_norm",
                    "add_bias_linear")



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
    model: ModelType = setting("gpt", '"gpt" (learned absolute positions, SDPA) or "txl" (Transformer-XL: relative '
                                "positions + memory)")
    vocab_size: int = setting(256, "token vocabulary (the pretraining driver's default: the data's)")
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(8, "attention heads")
    d_model: int = setting(256, "model width d")
    d_inner: int = setting(512, "dense FFN width (and the experts' width unless --expert-ffn-hidden-size is set)")
    seq_len: int = setting(512, "GPT: context length; TXL: tgt_len (segment length)")
    mem_len: int = setting(0, "TXL: hidden states of previous segments kept per layer (the driver's default for txl: "
                              "seq_len)")
    dropout: float = setting(0.0, "dropout on embeddings and residual branches")
    attn_dropout: float = setting(0.0, "dropout on attention weights")
    tie_embeddings: bool = setting(True, "the output layer shares the token embedding")
    moe_layers: str = setting("all", "blocks with an MoE FFN: all, every_other (1, 3, 5, ...), none, or a comma list "
                                     '"0,2"')
    expert_ffn: Optional[int] = setting(None, "experts' hidden width; none: --ffn-hidden-size")
    moe: MoEConfig = setting(factory=lambda: MoEConfig.from_settings({"router": "topk", "num_experts": 8, "top_k": 2}),
                             help="the MoE settings (moe_config fills in the fields MoEConfig marks by_model)")
    init_std: float = setting(0.02, "standard deviation of the normal initialisation of the weights")
    normalization: Normalization = setting("LayerNorm", "GPT: the block's and the final norm, LayerNorm or RMSNorm (OLMoE, "
                                              "Mixtral, Qwen-MoE)")
    norm_epsilon: float = setting(1e-5, "GPT: epsilon of every norm")
    swiglu: bool = setting(False, "GPT: SwiGLU MLPs, down(silu(gate x) * up x), for the dense FFN and the experts "
                                  "(OLMoE)")
    position_embedding_type: PositionEmbedding = setting("learned_absolute", "GPT: learned_absolute positions or rope (rotary, on "
                                                               "queries and keys)")
    rotary_base: float = setting(10000.0, "GPT with rope: the base theta of the rotary frequencies")
    qk_norm: QKNorm = setting("none", "GPT: norm of queries and keys before attention: none, head (each head, Megatron's "
                                   "--qk-layernorm) or hidden (the whole projection, OLMoE)")
    add_bias_linear: bool = setting(True, "GPT: biases in the attention projections, the dense FFN and the experts")

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "n_layer": ("--num-layers",), "n_head": ("--num-attention-heads",), "d_model": ("--hidden-size",),
        "d_inner": ("--ffn-hidden-size",), "seq_len": ("--seq-length",), "expert_ffn": ("--expert-ffn-hidden-size",),
        "dropout": ("--hidden-dropout",), "attn_dropout": ("--attention-dropout",),
        "tie_embeddings": ("--tie-embeddings", "--untie-embeddings-and-output-weights=false"),
        "init_std": ("--init-method-std", "--init-std"),
        "qk_norm": ("--qk-norm", "--qk-layernorm=head"),
        "add_bias_linear": ("--add-bias-linear", "--disable-bias-linear=false")}

    def __post_init__(self):
        if not isinstance(self.moe, MoEConfig) or self.moe.filled:
            what = "a layer's MoEConfig" if isinstance(self.moe, MoEConfig) else f"a {type(self.moe).__name__}"
            raise TypeError(f"ModelConfig.moe is the model's MoE settings, not {what}: give "
                            f"MoEConfig.from_settings({{...}}) (a record: ModelConfig.from_dict; a change: "
                            f"replace_moe)")
        self.validate()

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelConfig":
        """The config of a `to_dict` record (a checkpoint's ``model_config``, an export's, a config file's model and
        moe sections): ``moe`` holds MoE settings (`MoEConfig.from_settings`: the others at their defaults, retired
        keys ignored); without it, the default settings."""
        kw = dict(record)
        if "moe" in kw:
            kw["moe"] = MoEConfig.from_settings(kw["moe"])
        return cls(**kw)

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.model not in MODEL_TYPES:
            bad(f"unknown model {self.model!r}: choose one of {', '.join(MODEL_TYPES)} (--model)")
        for f in dataclasses.fields(self):  # every number finite (a NaN passes every comparison below)
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"{f.name}={v} is not a finite number: give a real value")
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
        for name, choices in (("normalization", NORMALIZATIONS), ("position_embedding_type", POSITION_EMBEDDINGS),
                              ("qk_norm", QK_NORMS)):
            if getattr(self, name) not in choices:
                bad(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(choices)}")
        if not self.norm_epsilon > 0:
            bad(f"norm_epsilon={self.norm_epsilon} must be > 0 (--norm-epsilon)")
        if not self.rotary_base > 1:
            bad(f"rotary_base={self.rotary_base} must be > 1 (--rotary-base)")
        if self.position_embedding_type == "rope" and (self.d_model // self.n_head) % 2:
            bad(f"rope needs an even head dimension, and hidden size {self.d_model} / {self.n_head} heads = "
                f"{self.d_model // self.n_head}: change --hidden-size or --num-attention-heads")
        if self.model == "txl":
            changed = [f.name for f in dataclasses.fields(self) if f.name in GPT_BLOCK_FIELDS
                       and getattr(self, f.name) != f.default]
            if changed:
                bad(f"{changed[0]}={getattr(self, changed[0])!r} applies to --model gpt only (Transformer-XL keeps "
                    f"its own block): drop it or use --model gpt")
        given = self.moe.settings()  # an activation that was given (its default gives way to --swiglu)
        if self.swiglu and given.get("activation", "swiglu") != "swiglu":
            bad(f"swiglu=True and moe.activation={given['activation']!r} disagree: --swiglu makes every MLP SwiGLU; "
                f"drop --moe-activation or --swiglu")
        self.moe_layer_ids()  # raises on a bad pattern
        self.moe_config(0)  # MoEConfig validates the MoE settings

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def moe_layer_ids(self) -> List[int]:
        return parse_moe_layers(self.moe_layers, self.n_layer)

    @property
    def is_moe(self) -> bool:
        return self.moe.router != "dense" and bool(self.moe_layer_ids())

    @property
    def ep_size(self) -> int:
        return self.moe.ep_size

    def moe_config(self, layer: int) -> MoEConfig:
        mlp = {"activation": "swiglu"} if self.swiglu else {}  # the block's MLP form (SwiGLU: every MLP)
        if not self.add_bias_linear:
            mlp["linear_bias"] = False
        if layer in self.moe_layer_ids() and self.moe.router != "dense":
            return dataclasses.replace(self.moe, hidden_size=self.d_model,
                                       ffn_hidden_size=self.expert_ffn or self.d_inner, init_std=self.init_std,
                                       output_init_std=self.init_std / math.sqrt(2 * self.n_layer),
                                       vocab_size=self.vocab_size, **mlp)
        return MoEConfig(hidden_size=self.d_model, ffn_hidden_size=self.d_inner, router="dense",
                         dropout=self.moe.dropout, **mlp)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def replace_moe(self, **changes) -> "ModelConfig":
        """A copy whose MoE settings have ``changes`` (given settings from then on, `MoEConfig.replace`)."""
        return self.replace(moe=self.moe.replace(**changes))

    def to_dict(self) -> Dict[str, Any]:
        """A plain record for JSON: every field, ``moe`` as its given settings (`MoEConfig.settings`)."""
        return {f.name: self.moe.settings() if f.name == "moe" else getattr(self, f.name)
                for f in dataclasses.fields(self)}


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
            from ..moe.layer import ExpertMLP

            mods.append(ExpertMLP(D, S, m.activation, bias=m.linear_bias))
            if m.shared_expert_mode != "add":
                mods.append(torch.nn.Linear(D, 1 if m.shared_expert_mode == "gate" else 2))
    return sum(p.numel() for mod in mods for p in mod.parameters())


def mlp_params(d: int, f: int, swiglu: bool, bias: bool) -> int:
    """One MLP (the dense FFN or one expert): fc1 d -> f (SwiGLU: d -> 2f, gate and up) and fc2 f -> d."""
    return (2 if swiglu else 1) * f * (d + bias) + d * (f + bias)


def norm_params(cfg: ModelConfig, width: int) -> int:
    return width * (1 if cfg.normalization == "RMSNorm" else 2)


def count_params(cfg: ModelConfig) -> Dict[str, int]:
    """{"total", "active", "experts", "non_expert", "embedding"} of the whole model (all N experts, as with
    ep_size=1; a rank of an expert-parallel run holds N/ep of them).

    Experts are ``fc1 (D x F + F) + fc2 (F x D + D)`` each (SwiGLU: fc1 is D x 2F; without biases no F, D terms);
    "active" counts ``routes_per_token`` of them.
    """
    D, F, L, V = cfg.d_model, cfg.d_inner, cfg.n_layer, cfg.vocab_size
    bias = cfg.add_bias_linear
    ln = norm_params(cfg, D)
    if cfg.model == "gpt":
        attn = D * 3 * D + 3 * D * bias + D * D + D * bias  # fused QKV + out proj (biases unless disabled)
        attn += {"none": 0, "head": 2 * norm_params(cfg, cfg.head_dim), "hidden": 2 * ln}[cfg.qk_norm]
        emb = V * D + (cfg.seq_len * D if cfg.position_embedding_type == "learned_absolute" else 0)  # + positions
    else:
        H, Dh = cfg.n_head, D // cfg.n_head
        attn = D * 3 * D + D * D + D * D + 2 * H * Dh  # fused QKV, r_net, o_net (no biases) + u, v
        emb = V * D
    head = 0 if cfg.tie_embeddings else V * D  # untied output layer (no bias)
    experts = active_experts = dense = 0
    for i in range(L):
        m = cfg.moe_config(i)
        swiglu = m.activation == "swiglu"
        if m.router == "dense":
            dense += mlp_params(D, F, swiglu, m.linear_bias)
        else:
            one = mlp_params(D, m.ffn_hidden_size, swiglu, m.linear_bias)
            experts += m.num_experts * one
            active_experts += routes_per_token(m) * one
            dense += router_params(m)
    non_expert = emb + head + L * (attn + 2 * ln) + dense + ln  # + final norm
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
    # OLMoE-1B-7B itself (6.92B total, 1.28B active): RMSNorm, SwiGLU experts, RoPE, QK-norm over the whole
    # projection, no biases, a softmax router that does not renormalise its top-8, balance loss 0.01, router
    # z-loss 0.001, dropless.  tools/convert_hf.py imports its Hugging Face checkpoint into this shape.
    "olmoe-1b-7b": dict(n_layer=16, n_head=16, d_model=2048, d_inner=1024, seq_len=4096, vocab_size=50304,
                        tie_embeddings=False, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                        rotary_base=10000.0, qk_norm="hidden", add_bias_linear=False,
                        moe={"router": "topk", "num_experts": 64, "top_k": 8, "norm_topk_prob": False,
                             "balance_loss_coef": 0.01, "z_loss_coef": 0.001, "drop_tokens": False}),
}


def named_config(name: str, **overrides) -> ModelConfig:
    """The named shape with ``overrides`` on top (None values ignored; ``moe``: MoE settings, merged key by key
    into the shape's)."""
    if name not in NAMED:
        raise ConfigError(f"unknown config {name!r}: choose one of {', '.join(NAMED)} (--config)")
    kw = dict(NAMED[name])
    moe = dict(kw.pop("moe"))
    moe.update(overrides.pop("moe", {}) or {})
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(moe=MoEConfig.from_settings(moe), **kw)
