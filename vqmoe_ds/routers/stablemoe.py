"""StableMoE router: two stages.

Stage 1 (step < stage1_steps): a learned top-k router decides, with the balance loss, and a lightweight
router (a low-dimensional bottleneck on the detached token) is distilled from it by cross-entropy against
the learned router's first choice.  Stage 2: the distilled router is frozen and alone decides which
experts a token goes to, so the assignment no longer fluctuates; the combine weights still come from the
learned router's softmax at those experts, so the expert outputs stay scaled by a trained gate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Routing, balance_loss
from .topk import TopKRouter


class StableMoERouter(TopKRouter):
    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, stage1_steps: int = 1000, distill_dim: int = 16,
                 distill_coef: float = 1.0, balance_loss_coef: float = 0.01, normalize: bool = True, options=None):
        super().__init__(hidden_size, num_experts, k, balance_loss_coef, normalize=normalize, options=options)
        self.stage1_steps = stage1_steps
        self.distill_coef = distill_coef
        self.distilled = nn.Sequential(nn.Linear(hidden_size, distill_dim, bias=False),
                                       nn.Linear(distill_dim, num_experts, bias=False))
        # Stage 2 routes with a snapshot of the distilled router taken at the switch, kept in buffers: an
        # optimizer's momentum or weight decay would keep moving the parameters even without gradients.
        self.register_buffer("frozen_down", torch.zeros(distill_dim, hidden_size))
        self.register_buffer("frozen_up", torch.zeros(num_experts, distill_dim))
        self.register_buffer("frozen_taken", torch.tensor(False))

    @property
    def stage(self) -> int:
        return 1 if self.step_now < self.stage1_steps else 2

    @torch.no_grad()
    def _frozen_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen_taken):
            self.frozen_down.copy_(self.distilled[0].weight)
            self.frozen_up.copy_(self.distilled[1].weight)
            self.frozen_taken.fill_(True)
        return F.linear(F.linear(x_TD.float(), self.frozen_down.float()), self.frozen_up.float())

    def forward(self, x_TD: torch.Tensor, ids_T=None, seq_len=None) -> Routing:
        logits_TE = self.logits(x_TD)
        if self.stage == 1:
            routing = self.route(logits_TE, self.k, seq_len)
            down, up = self.distilled[0].weight.float(), self.distilled[1].weight.float()  # fp32 in a bf16 model too
            student_TE = F.linear(F.linear(x_TD.detach().float(), down), up)
            distill = F.cross_entropy(student_TE, logits_TE.detach().argmax(-1))
            routing.aux_loss = routing.aux_loss + self.distill_coef * distill
            routing.stats["distill_loss"] = distill.detach()
            return routing
        experts_TK = self._frozen_logits(x_TD).topk(self.k, dim=-1).indices
        probs_TE = self.scores(logits_TE)
        weights_TK = self.combine_weights(probs_TE.gather(1, experts_TK))
        bal = balance_loss(probs_TE.detach(), experts_TK, self.num_experts)
        return Routing(experts_TK, weights_TK, logits_TE.new_zeros(()), {"balance_loss": bal})
