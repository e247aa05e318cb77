"""The FFN slot of a block: `DenseFFN` (the dense baseline) or `MoELayer` (any router, VQMoE included).

`MoELayer` wraps a real ``deepspeed.moe.layer.MoE``: its experts are DeepSpeed ``Experts`` (marked
``allreduce=False`` with the expert group name), so the engine builds MoE parameter groups, ZeRO shards
them, and checkpoints save one file per expert.  The layer's forward, in named steps::

    route    -> who goes where: the router's (and for VQMoE the codebook's) decisions as a RouteGrid
    dispatch -> capacity, then the tokens to their experts' ranks (DeepSpeed's ep group all-to-all)
    experts  -> each local expert MLP on exactly its tokens
    combine  -> back to the tokens' ranks, weighted and summed

VQMoE (eq. 4-5):  f(x) = g_c(x) SMoE(x) + g_d(x) FFN_{code(x) mod N}(x~),  [g_c, g_d] = softmax(W_g x).
Both paths go through the same dispatch in one all-to-all: the token matrix is X = [x; x~] (2T rows), the
top-k routes of row t carry weights g_c w_tk, and row T+t carries one route to the code's expert with
weight g_d.  In ``discrete_only`` mode (eq. 7) only the discrete path runs: one expert per token.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..routers import Router, VQRouter, build_router
from .config import MoEConfig
from .dispatch import SortedDispatch, capacity_for, plan_routes
from .dispatch import RouteGrid
from .container import deepspeed_experts
from .grouped import grouped_experts, use_grouped
from ..kernels.counts import bincount

def _swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


_ACT_FNS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": _swiglu}


class ExpertMLP(nn.Module):
    """One expert (and the dense FFN): Linear -> activation -> dropout -> Linear.

    SwiGLU (``activation="swiglu"``): ``fc1`` projects to 2F rows, the gate's F rows first and the up projection's
    F rows after them (Megatron's fused layout, and transformers' fused ``gate_up_proj``); the activation is
    silu(gate) * up and ``fc2`` is the down projection.  ``bias=False``: no biases (OLMoE, Mixtral)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size * (2 if activation == "swiglu" else 1), bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.act = _ACT_FNS[activation]
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DenseFFN(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.mlp = ExpertMLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.dropout, cfg.linear_bias)

    def forward(self, x, mask=None, ids=None):
        return self.mlp(x), x.new_zeros((), dtype=torch.float32)

    def stats(self) -> Dict[str, torch.Tensor]:
        return {}


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.hidden_size
        expert = ExpertMLP(D, cfg.ffn_hidden_size, cfg.activation, cfg.dropout, cfg.linear_bias)
        # routing and dispatch are ours; the container and its experts are DeepSpeed's (container.py says why)
        self.moe = deepspeed_experts(expert, D, E, cfg.ep_size, owner="MoELayer")
        self.discrete = cfg.router == "vqmoe"
        self.continuous = not (self.discrete and cfg.vqmoe_mode == "discrete_only")
        self.router: Router = build_router(cfg) if self.continuous else None
        self.vq_router: VQRouter = build_router(cfg, "vq") if self.discrete else None
        self.mix = nn.Linear(D, 2) if (self.discrete and self.continuous) else None  # W_g of eq. 5
        S = cfg.shared_expert_size  # a dense expert every token passes through (not an expert-parallel one)
        self.shared = ExpertMLP(D, S, cfg.activation, cfg.dropout, cfg.linear_bias) if S else None
        self.shared_gate = nn.Linear(D, 1 if cfg.shared_expert_mode == "gate" else 2) \
            if S and cfg.shared_expert_mode != "add" else None
        if self.shared is not None:
            with torch.no_grad():
                for name, p in list(self.shared.named_parameters()) + \
                        [("gate." + n, p) for n, p in (self.shared_gate.named_parameters() if self.shared_gate else [])]:
                    if p.is_meta:
                        continue
                    if name.endswith("bias"):
                        p.zero_()
                    else:
                        p.normal_(0.0, cfg.output_init_std if name.startswith("fc2") and cfg.output_init_std
                                  else cfg.init_std)
        self._stats: Dict[str, torch.Tensor] = {}
        self.reset_experts(int(torch.randint(0, 2**31 - 1, (), device="cpu").item()))  # cpu: builds under a meta device too

    def reset_experts(self, seed: int) -> None:
        init_experts_by_global_id(self.experts, self.cfg.ep_size, seed, self.cfg.init_std, self.cfg.output_init_std)

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_group(self):
        return self.moe.deepspeed_moe.ep_group

    # ---- route ------------------------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, ids_T: Optional[torch.Tensor] = None, seq_len: Optional[int] = None):
        """(X_SD, RouteGrid, aux_loss, stats): the token matrix to dispatch and its routes."""
        T = x_TD.shape[0]
        stats, aux = {}, x_TD.new_zeros((), dtype=torch.float32)
        cont = disc = None
        logits_TE = mix_T2 = None
        if self.mix is not None and getattr(self.router, "fusable", False):
            logits_TE, mix_T2 = self._fused_projections(x_TD)
        if self.continuous:
            cont = self.router(x_TD, ids_T, seq_len) if logits_TE is None else \
                self.router(x_TD, ids_T, seq_len, logits_TE=logits_TE)
            aux = aux + cont.aux_loss
            stats.update(cont.stats)
        if self.discrete:
            disc = self.vq_router(x_TD, ids_T)
            aux = aux + disc.aux_loss
            stats.update(disc.stats)
        if disc is None:
            return x_TD, RouteGrid(cont.experts_TK.t(), cont.weights_TK.t(), unit_weights=cont.unit_weights), aux, stats
        d_in = disc.quantized_TD if self.cfg.discrete_input == "quantized" else x_TD
        if cont is None:  # discrete only (eq. 7): one route per token, weight 1
            return d_in, RouteGrid(disc.experts_TK.t(), disc.weights_TK.t(), unit_weights=True), aux, stats
        g_T2 = F.softmax(self.mix(x_TD).float() if mix_T2 is None else mix_T2, dim=-1)
        stats["discrete_gate"] = g_T2[:, 1].mean().detach()
        w_c, w_d = cont.weights_TK.t() * g_T2[:, 0], g_T2[:, 1].unsqueeze(0)
        k = cont.experts_TK.shape[1]
        if self.cfg.discrete_input == "token":  # one matrix, k+1 routes per token
            grid = RouteGrid(torch.cat([cont.experts_TK.t(), disc.experts_TK.t()]), torch.cat([w_c, w_d]))
            return x_TD, grid, aux, stats
        # X = [x; x~]: rows < T carry the k continuous routes, rows >= T the single discrete route
        experts = torch.zeros(k, 2 * T, dtype=torch.long, device=x_TD.device)
        weights = torch.zeros(k, 2 * T, dtype=w_c.dtype, device=x_TD.device)
        valid = torch.zeros(k, 2 * T, dtype=torch.bool, device=x_TD.device)
        experts[:, :T], experts[0, T:] = cont.experts_TK.t(), disc.experts_TK[:, 0]
        weights = torch.cat([w_c, torch.cat([w_d, w_c.new_zeros(k - 1, T)])], dim=1)
        valid[:, :T], valid[0, T:] = True, True
        flat_K2T = torch.arange(k * 2 * T, device=x_TD.device).view(k, 2 * T)
        valid_index = torch.cat([flat_K2T[0], flat_K2T[1:, :T].reshape(-1)])  # the same routes, in flat order
        return torch.cat([x_TD, d_in]), RouteGrid(experts, weights, valid, valid_index=valid_index), aux, stats

    def _fused_projections(self, x_TD: torch.Tensor):
        """The router's logits x W_e^T and the mixing gate's x W_g^T + b_g as one fp32 matmul over [W_e; W_g]: x is
        read once, and the backward adds one [T, E+2] x [E+2, D] product into x's gradient instead of two.  (The
        default codebook works in the model dimension: it has no in-projection to fuse.)"""
        E = self.router.wg.weight.shape[0]
        w = torch.cat([self.router.wg.weight, self.mix.weight]).float()
        out_TJ = F.linear(x_TD.float(), w)
        return out_TJ[:, :E], out_TJ[:, E:] + self.mix.bias.float()

    # ---- forward: route -> dispatch -> experts -> combine -------------------------------------------------
    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None):
        """``y, aux = layer(x_BTD, mask_BT, ids_BT)``.  ``mask``: False marks tokens (padding) that take no route,
        no expert capacity and no part in the auxiliary losses and statistics; their output is 0.  ``ids``: the
        input token ids, for routers that route by token (hash routing)."""
        D = x.shape[-1]
        x_TD = x.reshape(-1, D)
        ids_T = ids.reshape(-1) if ids is not None else None
        if mask is None:
            seq_len = x.shape[-2] if x.dim() >= 3 else None  # for the per-sequence balance loss
            y_TD, aux = self._forward_tokens(x_TD, ids_T, seq_len=seq_len)
        else:
            keep_T = mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)  # a host sync: masked batches only
            y_kD, aux = self._forward_tokens(x_TD.index_select(0, keep_T),
                                             ids_T.index_select(0, keep_T) if ids_T is not None else None,
                                             seq_len=None)
            y_TD = y_kD.new_zeros(x_TD.shape).index_copy(0, keep_T, y_kD)
        if self.shared is not None:
            y_TD = self._add_shared(x_TD, y_TD)
        return y_TD.reshape(x.shape), aux

    def _add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """The shared expert's output added ("add"), added through a sigmoid gate ("gate", Qwen2-MoE), or mixed
        with the routed output by a 2-way softmax ("residual", DeepSpeed's PR-MoE)."""
        s_TD = self.shared(x_TD)
        mode = self.cfg.shared_expert_mode
        if mode == "add":
            return y_TD + s_TD
        if mode == "gate":
            return y_TD + torch.sigmoid(self.shared_gate(x_TD)) * s_TD
        c_T2 = F.softmax(self.shared_gate(x_TD).float(), dim=-1).to(y_TD.dtype)
        return y_TD * c_T2[:, :1] + s_TD * c_T2[:, 1:]

    def _forward_tokens(self, x_TD: torch.Tensor, ids_T: Optional[torch.Tensor], seq_len: Optional[int] = None):
        T = x_TD.shape[0]
        X_SD, grid, aux, stats = self.route(x_TD, ids_T, seq_len)
        if T == 0:  # a rank with only padding still takes part in the all-to-all; its losses are means over nothing
            aux = torch.zeros_like(aux)
        y_TD = self._forward_sorted(X_SD, grid, T, stats)
        self._stats = stats
        return y_TD, aux

    def _capacity(self, num_routes: int):
        if not self.cfg.drop_tokens:
            return None
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return capacity_for(num_routes, self.cfg.num_experts, cf, self.cfg.min_capacity)

    def _forward_sorted(self, X_SD, grid: RouteGrid, T: int, stats):
        E, P = self.cfg.num_experts, self.cfg.ep_size
        rows_R, experts_R, weights_R = grid.flat()
        grouped = use_grouped(self.cfg.expert_impl, X_SD, self.cfg.hidden_size,
                              self.experts[0].fc1.out_features)
        plan = plan_routes(experts_R, E, self._capacity(experts_R.numel()), sync_free=grouped and P == 1)
        stats["expert_load"] = bincount(experts_R, E).detach()
        stats["dropped_fraction"] = (1.0 - plan.keep_R.float().mean()).detach()
        # dispatch
        if P > 1 and self.ep_group is None:
            raise RuntimeError(f"MoE layer with ep_size={P} has no expert-parallel group yet: create the DeepSpeed "
                               f"engine (deepspeed.initialize) or call vqmoe_ds.parallel.setup_expert_parallel(model) "
                               f"before the first forward")
        dispatch = SortedDispatch(E, P, self.ep_group if P > 1 else None)
        x_MD, counts = dispatch.dispatch(X_SD, rows_R, experts_R, plan, host_counts=not grouped)
        # experts: one grouped GEMM per projection over all local experts, or each local expert on exactly its
        # rows (split, not slicing: its backward is one cat instead of a full-size zero tensor per expert)
        if grouped:
            y_chunks = [grouped_experts(self.experts, x_MD, counts)]
        else:
            y_chunks = [expert(x_nD) for expert, x_nD in zip(self.experts, torch.split(x_MD, counts))]
        # combine
        return dispatch.combine(y_chunks, rows_R % T, weights_R, T, unit_weights=grid.unit_weights)

    def stats(self) -> Dict[str, torch.Tensor]:
        """Detached numbers of the last forward: expert_load (routes per expert, before capacity),
        dropped_fraction, balance_loss, vq_loss, code_counts, codes_used, discrete_gate, ..."""
        return dict(self._stats)


@torch.no_grad()
def init_experts_by_global_id(experts: nn.ModuleList, ep_size: int, seed: int, init_std: float,
                              output_std: Optional[float] = None) -> None:
    """Give every expert its own initialisation, drawn from (seed, global expert id): N(0, init_std) weights
    (the output projection ``fc2``: N(0, output_std), the depth-scaled std the model gives every residual
    branch's output), zero biases.

    DeepSpeed's ``Experts`` deep-copies one expert module, so all experts would start identical.  Seeding
    by the *global* id makes expert e the same tensor whatever the expert-parallel size, so an ep=2 run
    starts from exactly the model of an ep=1 run.
    """
    first = expert_parallel_rank(ep_size) * len(experts)
    for i, expert in enumerate(experts):
        g = torch.Generator().manual_seed(seed * 1_000_003 + first + i)
        for name, p in expert.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("weight"):
                std = output_std if output_std is not None and name.startswith("fc2") else init_std
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.zero_()


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's position in its expert-parallel group, as DeepSpeed lays the groups out by default
    (``use_data_before_expert_parallel_=False``: consecutive ranks form an ep group).  The container's gate
    (`container.GroupOnlyGate`) checks it against the real group once DeepSpeed creates it."""
    import torch.distributed as dist

    if ep_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank() % ep_size


def build_ffn(cfg: MoEConfig) -> nn.Module:
    return DenseFFN(cfg) if cfg.router == "dense" else MoELayer(cfg)
