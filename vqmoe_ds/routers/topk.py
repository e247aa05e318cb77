"""Top-k router (the SMoE baseline) and the routing options of current MoE systems, shared by every router that
picks its experts from learned scores (XMoE, StableMoE, SMoE-Dropout and VQMoE's continuous path inherit it).

scores s = softmax(W_e x) (or an independent sigmoid per expert); each token goes to its k best experts.  The
combine weight of a route:

  * k = 1: the score s_e itself (Switch Transformer; ``top1_weight="score"``), or exactly 1 (``"one"``: the softmax
    over the chosen logit alone, as Megatron-core's default post-softmax routing and FastMoE's gates compute it);
    with weight 1 the router gets no gradient from the task, only from its auxiliary losses;
  * k >= 2: s_e / sum of the k chosen s (GShard, Mixtral, DeepSeek-V3; ``normalize=True``) or s_e as is (OLMoE,
    Qwen-MoE; ``normalize=False``);
  * times ``scaling`` (DeepSeek-V3's routed scaling factor).

Options (`TopKOptions`), each as Megatron-core names it:

  * balance loss (``balancing``): Switch/GShard's N sum_e f_e P_e over the micro-batch (``aux_loss``), averaged over
    the sequences with f and P per sequence (``seq_aux_loss``, DeepSeek-V2), or with f the load of the global
    batch -- the expert counts summed over the ranks that share the router -- and P this rank's (``global_aux_loss``);
    with sigmoid scores P uses the scores normalised per token;
  * z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE), weighted by ``z_loss_coef``;
  * expert bias (aux-loss-free balancing, DeepSeek-V3): a per-expert bias added to the scores for the choice of
    experts only; after each optimizer step `update_expert_biases` moves it by ``bias_update_rate`` times the sign
    of (mean load - expert load), the loads counted over the step's micro-batches and summed over the ranks
    that share the router;
  * forced balancing (benchmarking): token t's routes go to experts (t k + j) mod N whatever the scores; the
    weights are still the scores of those experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import Router, Routing, balance_loss
from ..kernels.counts import bincount


@dataclass
class TopKOptions:
    normalize: bool = True  # k >= 2: renormalise the chosen scores
    top1_weight: str = "score"  # k = 1: "score" (the route's score) or "one" (weight 1)
    score_function: str = "softmax"  # "softmax" or "sigmoid"
    scaling: float = 1.0  # combine weights x this
    balancing: str = "aux_loss"  # aux_loss | seq_aux_loss | global_aux_loss | none
    z_loss_coef: float = 0.0
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    force_balance: bool = False
    process_group: object = "data_parallel"  # the ranks that share the router (global loads, bias updates)


def _group(spec):
    from ..quantizers.codebook import resolve_group

    return resolve_group(spec)


class TopKRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, k: int = 2, balance_loss_coef: float = 0.01,
                 jitter: float = 0.0, normalize: bool = True, options: Optional[TopKOptions] = None):
        super().__init__(num_experts)
        self.k = k
        self.balance_loss_coef = balance_loss_coef
        self.jitter = jitter
        self.options = options or TopKOptions(normalize=normalize)
        self.normalize = self.options.normalize
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)
        if self.options.expert_bias:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
            self.register_buffer("load_E", torch.zeros(num_experts))  # routes per expert since the last update

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x_TD, self.wg.weight.float())

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.sigmoid() if self.options.score_function == "sigmoid" else logits_TE.softmax(-1)

    def combine_weights(self, top_TK: torch.Tensor) -> torch.Tensor:
        """The chosen experts' scores as combine weights (see the module docstring)."""
        if top_TK.shape[1] == 1 and self.options.top1_weight == "one":
            top_TK = torch.ones_like(top_TK)  # no path back to the scores: no task gradient for the router
        elif self.normalize and top_TK.shape[1] > 1:
            top_TK = top_TK / (top_TK.sum(-1, keepdim=True) + (1e-20 if self.options.score_function == "sigmoid" else 0))
        return top_TK * self.options.scaling if self.options.scaling != 1.0 else top_TK

    def choose(self, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        """The experts of each token: the top k of the scores (plus the expert bias), or round-robin when forced."""
        T = scores_TE.shape[0]
        if self.options.force_balance:
            t_T1 = torch.arange(T, device=scores_TE.device).unsqueeze(1)
            return (t_T1 * k + torch.arange(k, device=scores_TE.device)) % self.num_experts
        select_TE = scores_TE + self.expert_bias_E if self.options.expert_bias else scores_TE
        return select_TE.topk(k, dim=-1).indices

    def balance(self, scores_TE: torch.Tensor, experts_TK: torch.Tensor, seq_len: Optional[int]) -> torch.Tensor:
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if self.options.score_function == "sigmoid" \
            else scores_TE
        kind, E = self.options.balancing, self.num_experts
        if kind == "seq_aux_loss" and seq_len and probs_TE.shape[0] % seq_len == 0:
            S, (T, K) = probs_TE.shape[0] // seq_len, experts_TK.shape
            counts_SE = torch.zeros(S, E, dtype=probs_TE.dtype, device=probs_TE.device)
            counts_SE.scatter_add_(1, experts_TK.reshape(S, seq_len * K),
                                   torch.ones(S, seq_len * K, dtype=probs_TE.dtype, device=probs_TE.device))
            f_SE = counts_SE / (seq_len * K)
            P_SE = probs_TE.reshape(S, seq_len, E).mean(1)
            return (E * (f_SE * P_SE).sum(-1)).mean()
        if kind == "global_aux_loss":
            T, K = experts_TK.shape
            counts_E = bincount(experts_TK, E).to(probs_TE.dtype)
            total = torch.full((1,), float(T * K), dtype=probs_TE.dtype, device=probs_TE.device)
            group = _group(self.options.process_group)
            if group is not None:
                counts_E, total = counts_E.clone(), total.clone()
                dist.all_reduce(counts_E, group=group)
                dist.all_reduce(total, group=group)
            return E * (counts_E / total * probs_TE.mean(0)).sum()
        return balance_loss(probs_TE, experts_TK, E)

    def route(self, logits_TE: torch.Tensor, k: int, seq_len: Optional[int] = None) -> Routing:
        scores_TE = self.scores(logits_TE)
        experts_TK = self.choose(scores_TE, k)
        weights_TK = self.combine_weights(scores_TE.gather(1, experts_TK))
        stats, aux = {}, logits_TE.new_zeros(())
        if self.options.balancing != "none":
            bal = self.balance(scores_TE, experts_TK, seq_len)
            aux = aux + self.balance_loss_coef * bal
            stats["balance_loss"] = bal.detach()
        if self.options.z_loss_coef > 0:
            z = torch.logsumexp(logits_TE, dim=-1).square().mean()
            aux = aux + self.options.z_loss_coef * z
            stats["z_loss"] = z.detach()
        if self.options.expert_bias:
            if self.training:
                self.load_E += bincount(experts_TK, self.num_experts).to(self.load_E.dtype)
            stats["expert_bias_range"] = (self.expert_bias_E.max() - self.expert_bias_E.min()).detach()
        return Routing(experts_TK, weights_TK, aux, stats)

    def forward(self, x_TD: torch.Tensor, ids_T=None, seq_len: Optional[int] = None,
                logits_TE: Optional[torch.Tensor] = None) -> Routing:
        """``logits_TE``: the logits ``x W_e^T`` computed by the caller (the MoE layer fuses them with its other
        projections of x into one matmul, see ``fusable``)."""
        return self.route(self.logits(x_TD) if logits_TE is None else logits_TE, self.k, seq_len)

    @property
    def fusable(self) -> bool:
        """Whether the logits are exactly ``x.float() @ wg.weight.float().T`` (no jitter), so that a caller may
        compute them inside a larger matmul."""
        return type(self) is TopKRouter and not (self.training and self.jitter > 0)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: bias += rate * sign(mean load - load), the loads of the step summed over the
        ranks that share the router (collective over them); then the counts restart."""
        if not self.options.expert_bias:
            return
        load = self.load_E.clone()
        group = _group(self.options.process_group)
        if group is not None:
            dist.all_reduce(load, group=group)
        self.expert_bias_E += self.options.bias_update_rate * torch.sign(load.mean() - load)
        self.load_E.zero_()


def update_expert_biases(model: nn.Module) -> None:
    """Every expert-bias router of ``model`` takes its update (call on every rank after each optimizer step)."""
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.update_expert_bias()
