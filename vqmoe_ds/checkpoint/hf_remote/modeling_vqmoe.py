"""A VQMoE language model (arXiv 2411.19402) for transformers, exported by vqmoe-ds
(``tools/export_checkpoint.py --format hf``).

The model is OLMoE's decoder (transformers' ``OlmoeForCausalLM``: embeddings, RMSNorm, rotary attention with
QK-norm, the LM head) with every sparse MLP replaced by `VQMoEBlock`:

    pretrain mode (eq. 4-5):  y = g_c(x) sum_k w_k FFN_{e_k}(x) + g_d(x) FFN_{code(x) mod N}(x~),
                              [g_c, g_d] = softmax(W_g x + b_g)
    discrete_only (eq. 7):    y = FFN_{code(x) mod N}(x~)

where e_k and w_k are the top-k router's experts and weights, code(x) is the token's nearest codebook entry and x~
the quantized token (the code, projected back and scaled to the token's norm as configured).  Every expert is
OLMoE's SwiGLU MLP, ``down(silu(gate x) * up x)``.  Inference only: the routing is dropless and no auxiliary loss
is computed.  Loading it needs ``trust_remote_code=True`` because this file is code; vqmoe-ds itself reads the
same folder without running it (``tools/convert_hf.py``).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM

from .configuration_vqmoe import VQMoEOlmoeConfig


class VQMoEExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VQMoEBlock(nn.Module):
    """One layer's experts with VQMoE routing.  Parameters: ``gate`` (the top-k router W_e, [N, D]), ``mix`` (the
    2-way gate W_g, b_g), ``codebook`` [K, C], ``vq_in`` / ``vq_out`` (the projections when C != D),
    ``expert_bias`` (the choice-only bias of aux-loss-free balancing), ``experts``."""

    def __init__(self, config: VQMoEOlmoeConfig):
        super().__init__()
        D, N = config.hidden_size, config.num_experts
        C = config.codebook_dim or D
        self.num_experts, self.top_k, self.config = N, config.num_experts_per_tok, config
        self.continuous = config.vqmoe_mode == "pretrain"
        if self.continuous:
            self.gate = nn.Linear(D, N, bias=False)
            self.mix = nn.Linear(D, 2)
            if config.router_expert_bias:
                self.register_buffer("expert_bias", torch.zeros(N))
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, C))
        self.projected = C != D
        if self.projected:
            self.vq_in = nn.Linear(D, C)
            self.vq_out = nn.Linear(C, D)
        self.token_scale = config.vq_scale == "token" and config.vq_distance == "cosine" and not self.projected
        self.experts = nn.ModuleList(VQMoEExpert(D, config.intermediate_size) for _ in range(N))

    def quantize(self, x_TD: torch.Tensor):
        """(x~ [T, D], codes [T]): the nearest code of every token (ties: the lowest index), in fp32."""
        z = x_TD.float()
        if self.projected:
            z = F.linear(z, self.vq_in.weight.float(), self.vq_in.bias.float())
        cb = self.codebook.float()
        if self.config.vq_distance == "cosine":
            z, cb = F.normalize(z, dim=-1), F.normalize(cb, dim=-1)
            codes = (z @ cb.t()).argmax(-1)
        else:
            codes = ((cb * cb).sum(-1) - 2.0 * (z @ cb.t())).argmin(-1)
        q = cb[codes]
        if self.projected:
            q = F.linear(q, self.vq_out.weight.float(), self.vq_out.bias.float())
        if self.token_scale:
            q = q * x_TD.float().norm(dim=-1, keepdim=True)
        return q.to(x_TD.dtype), codes

    def route(self, x_TD: torch.Tensor):
        """Top-k experts [T, k], their combine weights [T, k] and the gate [T, 2], from one fp32 product of x with
        [W_e; W_g]."""
        N, k = self.num_experts, self.top_k
        out = F.linear(x_TD.float(), torch.cat([self.gate.weight, self.mix.weight]).float())
        logits, g = out[:, :N], F.softmax(out[:, N:] + self.mix.bias.float(), dim=-1)
        sigmoid = self.config.router_score_function == "sigmoid"
        scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
        select = scores + self.expert_bias if self.config.router_expert_bias else scores
        experts = select.topk(k, dim=-1).indices
        w = scores.gather(1, experts)
        if self.config.norm_topk_prob:  # as OLMoE: at k = 1 every weight becomes 1
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if sigmoid else 0.0))
        if self.config.router_topk_scaling_factor != 1.0:
            w = w * self.config.router_topk_scaling_factor
        return experts, w, g

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        q, codes = self.quantize(x)
        d_in = q if self.config.discrete_input == "quantized" else x
        d_expert = codes % self.num_experts
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if self.continuous:
            experts, w, g = self.route(x)
            w_c, w_d = w * g[:, :1], g[:, 1]
        else:
            w_d = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            if self.continuous:
                token, slot = (experts == e).nonzero(as_tuple=True)
                if token.numel():
                    out.index_add_(0, token, expert(x[token]).float() * w_c[token, slot].unsqueeze(1))
            token = (d_expert == e).nonzero(as_tuple=True)[0]
            if token.numel():
                out.index_add_(0, token, expert(d_in[token]).float() * w_d[token].unsqueeze(1))
        return out.to(hidden_states.dtype).reshape(shape)


class VQMoEOlmoeForCausalLM(OlmoeForCausalLM):
    config_class = VQMoEOlmoeConfig

    def __init__(self, config: VQMoEOlmoeConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = VQMoEBlock(config)


__all__ = ["VQMoEOlmoeForCausalLM", "VQMoEBlock"]
