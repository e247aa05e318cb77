"""One config dataclass for a feed-forward slot of the model: dense FFN, an MoE with any router, or VQMoE.

`MoEConfig.build()` returns the module the model puts in a block's FFN slot.  Every such module has the
same call signature::

    y_BTD, aux_loss = ffn(x_BTD, mask_BT=None, ids_BT=None)   # padding mask, input token ids (hash routing)

where ``aux_loss`` is a scalar tensor holding all auxiliary losses of the layer, already weighted
(balance loss x ``balance_loss_coef``, VQ loss x ``vq_alpha``, StableMoE distillation, ...), so that the
model's training loss is ``task_loss + sum(aux_loss over layers)``.  Detached numbers for logging come from
``ffn.stats()`` (expert counts, code usage, the separate loss terms).

A config whose ``hidden_size`` and ``ffn_hidden_size`` are unset holds the MoE *settings* of a model
(``ModelConfig.moe``): the fields marked ``by_model`` are the model config's to fill in for each layer
(``ModelConfig.moe_config``), and the settings are checked then, for the layers that are MoE layers.  Such a config
remembers which settings were given (`MoEConfig.settings`), so that a record of it holds what it was made from.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Tuple

from ..errors import ConfigError  # re-exported: the configs of every layer raise it
from ..fields import set_by_model, setting

Router = Literal["dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "hash", "cluster", "vq", "vqmoe"]
ROUTERS = typing.get_args(Router)
HashTable = Literal["random", "balanced"]
HASH_TABLES = typing.get_args(HashTable)
BalancingType = Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"]
BALANCING_TYPES = typing.get_args(BalancingType)
ScoreFunction = Literal["softmax", "sigmoid"]
SCORE_FUNCTIONS = typing.get_args(ScoreFunction)
Top1Weight = Literal["score", "one"]
TOP1_WEIGHTS = typing.get_args(Top1Weight)
SharedExpertMode = Literal["add", "gate", "residual"]
SHARED_EXPERT_MODES = typing.get_args(SharedExpertMode)
SCORED_ROUTERS = ("topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe")  # routers with router logits (z-loss)
TRAINED_TOPK_ROUTERS = ("topk", "xmoe", "vqmoe")  # learned top-k selection: sigmoid scores, expert bias, forcing
VQKind = Literal["codebook", "residual", "lfq"]
VQ_KINDS = typing.get_args(VQKind)
Distance = Literal["l2", "cosine"]
VQ_DISTANCES = typing.get_args(Distance)
VQMoEMode = Literal["pretrain", "discrete_only"]
VQMOE_MODES = typing.get_args(VQMoEMode)
ExpertImpl = Literal["auto", "grouped", "loop"]
EXPERT_IMPLS = typing.get_args(ExpertImpl)
DiscreteInput = Literal["quantized", "token"]
DISCRETE_INPUTS = typing.get_args(DiscreteInput)
Activation = Literal["gelu", "relu", "silu", "swiglu"]
ACTIVATIONS = typing.get_args(Activation)
VQScale = Literal["token", "code"]
VQ_SCALES = typing.get_args(VQScale)


@dataclass
class MoEConfig:
    hidden_size: Optional[int] = setting(None, "the model width d (set by the model: --hidden-size)", by_model=True)
    ffn_hidden_size: Optional[int] = setting(None, "each expert's hidden width (set by the model: "
                                                   "--expert-ffn-hidden-size)", by_model=True)
    router: Router = setting("topk", '"dense" (no MoE); learned: topk, xmoe, stablemoe, smoe_dropout; discrete, one '
                                  'expert per token: hash, cluster; "vqmoe" (eq. 4-5; "vq" = vqmoe in discrete_only '
                                  "mode, eq. 7)")
    num_experts: int = setting(8, "experts N of every MoE layer")
    top_k: int = setting(2, "experts per token of the learned router (VQMoE's continuous path)")
    norm_topk_prob: bool = setting(True, "k >= 2: renormalise the chosen probabilities to sum to 1 (GShard); off: as "
                                         "is (OLMoE). k = 1 never does (Switch)")
    top1_weight: Top1Weight = setting("score", "k = 1: the route's combine weight: its router probability (score; Switch, "
                                               "the router learns from the task) or 1 (one; softmax over the chosen "
                                               "logit alone: Megatron-core's default and FastMoE's gates; the router "
                                               "then learns only from its auxiliary losses)")
    ep_size: int = setting(1, "expert-parallel size: ranks that share one layer's experts (a divisor of N and of the "
                              "world size)")
    activation: Activation = setting("gelu", "expert MLP activation; swiglu: fc1 holds gate and up, down(silu(gate x) * up "
                                      "x) (OLMoE, Mixtral)")
    linear_bias: bool = setting(True, "biases in the experts' and the dense FFN's linears (set by the model: "
                                      "--add-bias-linear)", by_model=True)
    init_std: float = setting(0.02, "experts: N(0, init_std) weights, zero biases, drawn per *global* expert id (set "
                                    "by the model)", by_model=True)
    output_init_std: Optional[float] = setting(None, "std of the experts' output projection fc2 (the model sets "
                                                     "init_std / sqrt(2 n_layer)); none: init_std", by_model=True)
    dropout: float = setting(0.0, "dropout after the FFN / expert output")
    capacity_factor: float = setting(1.25, "training capacity per expert = ceil(factor x routes / N), at least "
                                           "--min-capacity")
    eval_capacity_factor: float = setting(2.0, "the capacity factor in evaluation")
    min_capacity: int = setting(4, "the smallest capacity of an expert")
    drop_tokens: bool = setting(True, "drop routes beyond capacity; --no-drop-tokens: dropless (capacity = the "
                                      "largest load)")
    expert_impl: ExpertImpl = setting("auto", "local experts as one grouped GEMM per projection (grouped) or a loop over "
                                       "experts (loop); auto: grouped for bf16 on CUDA sm90+, else loop")
    balance_loss_coef: float = setting(0.01, "weight of the Switch/GShard load-balancing loss")
    load_balancing_type: BalancingType = setting("aux_loss", "the balance loss over the micro-batch (aux_loss), each sequence "
                                                   "(seq_aux_loss), the load of the global batch (global_aux_loss), "
                                                   "or none")
    z_loss_coef: float = setting(0.0, "weight of the router z-loss, mean logsumexp(logits)^2 (ST-MoE)")
    score_function: ScoreFunction = setting("softmax", "router scores: softmax over experts, or an independent sigmoid per "
                                             "expert (DeepSeek-V3)")
    topk_scaling_factor: float = setting(1.0, "the combine weights are multiplied by this (DeepSeek-V3: 2.5)")
    expert_bias: bool = setting(False, "aux-loss-free balancing: a per-expert bias on the scores, for selection only, "
                                       "nudged after each step towards even load (DeepSeek-V3)")
    bias_update_rate: float = setting(1e-3, "expert bias: the step of each update, bias += rate * sign(mean load - "
                                            "load)")
    force_load_balancing: bool = setting(False, "benchmarking: tokens go round-robin to experts whatever their scores "
                                                "(weights still from the scores)")
    shared_expert_size: int = setting(0, ">0: a dense shared expert of this width every token passes through, added "
                                         "to the routed output (DeepSeek-MoE, Qwen-MoE)")
    shared_expert_mode: SharedExpertMode = setting("add", 'shared expert: "add" it, "gate" it by sigmoid(w x) (Qwen2-MoE), or '
                                             "\"residual\": mix it with the routed output by softmax(W x) (DeepSpeed's "
                                             "PR-MoE)")
    router_jitter: float = setting(0.0, "multiplicative uniform noise (1 +- eps) on the router input in training")
    codebook_size: int = setting(16, "VQ codes K; the discrete path sends code c to expert c mod N, so K need not "
                                     "equal N")
    codebook_dim: Optional[int] = setting(None, "none: quantize in the model dim; else project down to this dim "
                                                "(VQGAN-style)")
    vq_kind: VQKind = setting("codebook", "quantizer: our codebook, residual VQ, or lookup-free quantization (LFQ)")
    vq_distance: Distance = setting("cosine", 'nearest code by "l2" (VQ-VAE) or "cosine" distance')
    vq_scale: VQScale = setting("token", "cosine codebook in the model dim: x~ = |x| v_code (\"token\", the token's scale) "
                                     'or the unit code ("code")')
    vq_alpha: float = setting(0.08, "weight alpha of the VQ loss (eq. 8)")
    vq_beta: float = setting(0.25, "commitment weight beta (eq. 8)")
    vq_ema: bool = setting(False, "EMA codebook updates instead of gradient updates")
    vq_ema_decay: float = setting(0.99, "decay of the EMA codebook updates")
    vq_kmeans_init: bool = setting(False, "initialise the codebook by k-means on the first batch")
    vq_kmeans_iters: int = setting(10, "k-means iterations of that initialisation")
    vq_dead_code_threshold: float = setting(0.0, ">0: restart codes whose EMA usage falls below this many tokens per "
                                                 "step")
    vq_num_quantizers: int = setting(2, "residual VQ depth")
    vqmoe_mode: VQMoEMode = setting("pretrain", '"pretrain": both paths (eq. 4-5); "discrete_only": only the discrete path '
                                          "(eq. 7)")
    freeze_vq: bool = setting(False, "the codebook and its projections receive no updates")
    discrete_input: DiscreteInput = setting("quantized", 'expert input of the discrete path: "quantized" (x~, eq. 5) or "token" '
                                               "(x)")
    xmoe_dim: int = setting(16, "XMoE: dimension of the low-dimensional routing space")
    xmoe_init_temperature: float = setting(0.07, "XMoE: initial temperature of its cosine router")
    stablemoe_stage1_steps: int = setting(1000, "StableMoE: steps of stage 1 (learned routing) before routing is "
                                                "frozen")
    stablemoe_distill_dim: int = setting(16, "StableMoE: dimension of the distilled router")
    stablemoe_distill_coef: float = setting(1.0, "StableMoE: weight of the distillation loss")
    smoe_dropout_k_start: int = setting(1, "SMoE-Dropout: k at step 0 (k grows linearly to k_end)")
    smoe_dropout_k_end: Optional[int] = setting(None, "SMoE-Dropout: k at the end of the schedule; none: num_experts")
    smoe_dropout_k_steps: int = setting(1000, "SMoE-Dropout: steps over which k grows")
    hash_table: HashTable = setting("random", "hash routing: a seeded random id -> expert table, or one balanced by the "
                                        "training data's token frequencies")
    hash_seed: int = setting(0, "hash routing: the seed of the random table")
    cluster_warmup_steps: int = setting(100, "clustering router: steps before k-means of the layer's inputs fixes the "
                                             "centroids")
    cluster_distance: Distance = setting("cosine", 'clustering router: nearest centroid by "cosine" or "l2" distance')
    vocab_size: Optional[int] = setting(None, "the token vocabulary (set by the model; hash routing's table size)",
                                        by_model=True)

    # command-line spellings (first = the flag, the rest aliases; "--flag=value" sets that value), and choices
    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "top_k": ("--top-k", "--topk"),
        "ep_size": ("--moe-expert-parallel-size", "--ep-size"),
        "activation": ("--moe-activation",),
        "dropout": ("--ffn-dropout",),
        "capacity_factor": ("--capacity-factor", "--moe-train-capacity-factor"),
        "eval_capacity_factor": ("--eval-capacity-factor", "--moe-eval-capacity-factor"),
        "min_capacity": ("--min-capacity", "--moe-min-capacity"),
        "drop_tokens": ("--drop-tokens", "--disable-moe-token-dropping=false"),
        "expert_impl": ("--moe-expert-impl", "--moe-grouped-gemm=grouped"),
        "balance_loss_coef": ("--balance-loss-coef", "--moe-loss-coeff", "--moe-aux-loss-coeff"),
        "load_balancing_type": ("--moe-router-load-balancing-type",),
        "z_loss_coef": ("--moe-z-loss-coeff",),
        "score_function": ("--moe-router-score-function",),
        "top1_weight": ("--moe-router-top1-weight",),
        "topk_scaling_factor": ("--moe-router-topk-scaling-factor",),
        "expert_bias": ("--moe-router-enable-expert-bias",),
        "bias_update_rate": ("--moe-router-bias-update-rate",),
        "force_load_balancing": ("--moe-router-force-load-balancing",),
        "shared_expert_size": ("--moe-shared-expert-intermediate-size",),
        "shared_expert_mode": ("--moe-shared-expert-mode",),
        "router_jitter": ("--router-jitter", "--moe-input-jitter-eps"),
    }
    # keys that checkpoints and config files of earlier versions hold, read and ignored: "dispatcher" (DeepSpeed's
    # MOELayer dispatch computes the same layer; bench/deepspeed_gate.py runs it for the comparison)
    RETIRED: ClassVar[Tuple[str, ...]] = ("dispatcher",)

    def __post_init__(self):
        # the given settings, in order (`settings`): made directly, those that differ from their defaults
        self._given = tuple(f.name for f in dataclasses.fields(self) if not set_by_model(f)
                            and getattr(self, f.name) != _default(f))
        if not self.filled:
            return  # a model's MoE settings, checked when it fills in a layer (ModelConfig.moe_config)
        if self.router == "vq":  # the short name of discrete-only VQMoE (eq. 7): one model, one implementation
            self.router, self.vqmoe_mode = "vqmoe", "discrete_only"
        self.validate()

    @property
    def filled(self) -> bool:
        """Whether the model filled in the layer's sizes (a layer's config, not only a model's MoE settings)."""
        return self.hidden_size is not None or self.ffn_hidden_size is not None

    @classmethod
    def model_set_fields(cls) -> Tuple[str, ...]:
        """The fields the model config fills in for each layer (marked ``by_model``): no settings of their own."""
        return tuple(f.name for f in dataclasses.fields(cls) if set_by_model(f))

    @classmethod
    def setting_names(cls) -> Tuple[str, ...]:
        """The MoE settings: every field but those the model fills in."""
        return tuple(f.name for f in dataclasses.fields(cls) if not set_by_model(f))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "MoEConfig":
        """A model's MoE settings from a record of `settings` (a checkpoint's ``model_config.moe``) or from overrides
        (a named shape's ``moe`` with the command line's on top): those given, every other at its default.  Retired
        keys (`RETIRED`) are ignored; any other key that is no setting (unknown, or a field the model fills in) is a
        TypeError."""
        given = {k: v for k, v in settings.items() if k not in cls.RETIRED}
        names = cls.setting_names()
        wrong = [k for k in given if k not in names]
        if wrong:
            what = "is filled in by the model config" if wrong[0] in cls.model_set_fields() else "is no MoE setting"
            raise TypeError(f"MoE settings: {wrong[0]!r} {what}: remove it (MoEConfig.setting_names() lists the "
                            f"settings)")
        cfg = cls(**given)
        cfg._given = tuple(given)
        return cfg

    def settings(self) -> Dict[str, Any]:
        """The given settings as a plain dict, for JSON records (a checkpoint's ``model_config.moe``, config.json's
        ``moe`` section): those of `from_settings` and those changed since by `replace`, in that order (a config made
        directly: those that differ from their defaults).  Every other setting is at its default."""
        return {name: getattr(self, name) for name in self._given}

    def all_settings(self) -> Dict[str, Any]:
        """Every MoE setting, defaults spelled out."""
        return {name: getattr(self, name) for name in self.setting_names()}

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.router not in ROUTERS:
            bad(f"unknown router {self.router!r}: choose one of {', '.join(ROUTERS)}")
        for f in dataclasses.fields(self):  # every number finite (a NaN passes every comparison below)
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"{f.name}={v} is not a finite number: give a real value")
        if any(size is None or size < 1 for size in (self.hidden_size, self.ffn_hidden_size)):
            bad(f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}: both must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout={self.dropout} must lie in [0, 1)")
        if self.activation not in ACTIVATIONS:
            bad(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.router == "dense":
            return
        if self.num_experts < 1:
            bad(f"num_experts={self.num_experts}: set --num-experts to 1 or more")
        if self.ep_size < 1 or self.num_experts % self.ep_size != 0:
            bad(f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}: "
                f"choose an expert-parallel size that divides the number of experts")
        if not 1 <= self.top_k <= self.num_experts:
            bad(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            bad(f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}: "
                f"must be > 0 (use drop_tokens=False for a dropless layer)")
        if self.output_init_std is not None and not self.output_init_std > 0:
            bad(f"output_init_std={self.output_init_std} must be > 0")
        if self.min_capacity < 0:
            bad(f"min_capacity={self.min_capacity} must be >= 0")
        if self.expert_impl not in EXPERT_IMPLS:
            bad(f"unknown expert implementation {self.expert_impl!r}: choose one of {', '.join(EXPERT_IMPLS)}")
        if self.router_jitter < 0:
            bad(f"router_jitter={self.router_jitter} must be >= 0 (0: no jitter)")
        if self.balance_loss_coef < 0:
            bad(f"balance_loss_coef={self.balance_loss_coef} must be >= 0")
        self._validate_routing_options(bad)
        if self.router == "vqmoe":
            if self.codebook_size < 1:
                bad(f"codebook_size={self.codebook_size}: the codebook needs K >= 1 codes (--codebook-size)")
            if self.vqmoe_mode == "discrete_only" and self.codebook_size < self.num_experts:
                bad(f"codebook_size={self.codebook_size} < num_experts={self.num_experts}: with routing by code only, "
                    f"experts {self.codebook_size}..{self.num_experts - 1} could never be chosen; give at least as many "
                    f"codes as experts (--codebook-size)")
            if self.codebook_dim is not None and self.codebook_dim < 1:
                bad(f"codebook_dim={self.codebook_dim} must be >= 1, or None to quantize in the model dim")
            if self.vq_kind not in VQ_KINDS:
                bad(f"unknown vq_kind {self.vq_kind!r}: choose one of {', '.join(VQ_KINDS)}")
            if self.vq_distance not in VQ_DISTANCES:
                bad(f"unknown vq_distance {self.vq_distance!r}: choose one of {', '.join(VQ_DISTANCES)}")
            if self.vq_scale not in VQ_SCALES:
                bad(f"unknown vq_scale {self.vq_scale!r}: choose one of {', '.join(VQ_SCALES)}")
            if self.vq_alpha < 0:
                bad(f"vq_alpha={self.vq_alpha} must be >= 0 (the paper uses 0.05-0.15)")
            if self.vq_beta < 0:
                bad(f"vq_beta={self.vq_beta} must be >= 0 (the paper uses 0.25)")
            if not 0.0 < self.vq_ema_decay < 1.0:
                bad(f"vq_ema_decay={self.vq_ema_decay} must be in (0, 1)")
            if self.vqmoe_mode not in VQMOE_MODES:
                bad(f"unknown vqmoe_mode {self.vqmoe_mode!r}: choose one of {', '.join(VQMOE_MODES)}")
            if self.discrete_input not in ("quantized", "token"):
                bad(f"unknown discrete_input {self.discrete_input!r}: choose 'quantized' or 'token'")
            if self.vq_kind == "lfq" and self.codebook_size & (self.codebook_size - 1):
                bad(f"codebook_size={self.codebook_size}: LFQ needs a power of two (2**bits codes)")
            if self.vq_kind == "residual" and self.vq_num_quantizers < 1:
                bad(f"vq_num_quantizers={self.vq_num_quantizers} must be >= 1")
        if self.router == "hash" and self.hash_table not in HASH_TABLES:
            bad(f"unknown hash_table {self.hash_table!r}: choose one of {', '.join(HASH_TABLES)}")
        if self.router == "hash" and self.vocab_size is not None and self.vocab_size < 1:
            bad(f"vocab_size={self.vocab_size} must be >= 1 for hash routing")
        if self.router == "cluster" and self.cluster_warmup_steps < 0:
            bad(f"cluster_warmup_steps={self.cluster_warmup_steps} must be >= 0")
        if self.router == "cluster" and self.cluster_distance not in VQ_DISTANCES:
            bad(f"unknown cluster_distance {self.cluster_distance!r}: choose one of {', '.join(VQ_DISTANCES)}")
        if self.router == "xmoe" and self.xmoe_dim < 1:
            bad(f"xmoe_dim={self.xmoe_dim} must be >= 1")
        if self.router == "xmoe" and self.xmoe_init_temperature <= 0:
            bad(f"xmoe_init_temperature={self.xmoe_init_temperature} must be > 0")
        if self.router == "stablemoe" and (self.stablemoe_stage1_steps < 0 or self.stablemoe_distill_dim < 1):
            bad("stablemoe_stage1_steps must be >= 0 and stablemoe_distill_dim >= 1")
        if self.router == "smoe_dropout":
            k_end = self.smoe_dropout_k_end or self.num_experts
            if not 1 <= self.smoe_dropout_k_start <= k_end <= self.num_experts:
                bad(f"SMoE-Dropout k schedule {self.smoe_dropout_k_start}->{k_end} must satisfy "
                    f"1 <= k_start <= k_end <= num_experts={self.num_experts}")

    def _validate_routing_options(self, bad) -> None:
        if self.load_balancing_type not in BALANCING_TYPES:
            bad(f"unknown load_balancing_type {self.load_balancing_type!r}: choose one of {', '.join(BALANCING_TYPES)}")
        if self.score_function not in SCORE_FUNCTIONS:
            bad(f"unknown score_function {self.score_function!r}: choose one of {', '.join(SCORE_FUNCTIONS)}")
        if self.top1_weight not in TOP1_WEIGHTS:
            bad(f"unknown top1_weight {self.top1_weight!r}: choose one of {', '.join(TOP1_WEIGHTS)}")
        if self.shared_expert_mode not in SHARED_EXPERT_MODES:
            bad(f"unknown shared_expert_mode {self.shared_expert_mode!r}: choose one of "
                f"{', '.join(SHARED_EXPERT_MODES)}")
        if not self.z_loss_coef >= 0:
            bad(f"z_loss_coef={self.z_loss_coef} must be >= 0")
        if not self.bias_update_rate >= 0:
            bad(f"bias_update_rate={self.bias_update_rate} must be >= 0")
        if not self.topk_scaling_factor > 0:
            bad(f"topk_scaling_factor={self.topk_scaling_factor} must be > 0")
        if self.shared_expert_size < 0:
            bad(f"shared_expert_size={self.shared_expert_size} must be >= 0 (0: no shared expert)")
        discrete_only = self.router == "vqmoe" and self.vqmoe_mode == "discrete_only"
        learned = self.router in TRAINED_TOPK_ROUTERS and not discrete_only
        if self.score_function == "sigmoid" and not learned:
            bad(f"score_function=sigmoid needs a learned top-k router, and router {self.router!r} "
                f"{'routes by its codes only' if discrete_only else 'has no such scores'}: use topk, xmoe or vqmoe")
        for name in ("expert_bias", "force_load_balancing"):
            if getattr(self, name) and not learned:
                bad(f"{name}=True needs a learned top-k router, not {self.router!r}"
                    f"{' in discrete_only mode' if discrete_only else ''}: use topk, xmoe or vqmoe")
        if self.z_loss_coef > 0 and (self.router not in SCORED_ROUTERS or discrete_only):
            bad(f"z_loss_coef={self.z_loss_coef} needs router logits, and router {self.router!r} has none: use a "
                f"learned router")

    @property
    def is_moe(self) -> bool:
        return self.router != "dense"

    def replace(self, **changes) -> "MoEConfig":
        """A copy with ``changes``; the settings among them count as given (`settings`)."""
        out = dataclasses.replace(self, **changes)
        names = self.setting_names()
        out._given = self._given + tuple(k for k in changes if k not in self._given and k in names)
        return out

    def build(self):
        """The FFN module for one block: a dense MLP or an MoE layer."""
        from .layer import build_ffn

        if not self.filled:
            raise TypeError("MoEConfig.build: hidden_size and ffn_hidden_size are unset (a model's MoE settings): "
                            "build the layer from ModelConfig.moe_config(layer), or give both sizes")
        return build_ffn(self)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
