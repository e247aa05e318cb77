"""The local experts as one grouped GEMM per projection instead of a Python loop over experts.

The rows of ``x_MD`` are sorted by local expert (``counts_E`` rows each, as the dispatch returns them).  The loop
path runs ``expert(x_nD)`` per expert: it needs the counts on the host (``.tolist()``, a device sync every forward)
and launches two small GEMMs per expert.  The grouped path runs ``torch.nn.functional.grouped_mm`` over all experts
at once with the offsets ``cumsum(counts_E)`` kept on the device: two launches per layer, no host sync.

The experts stay DeepSpeed ``Experts`` modules with one ``ExpertMLP`` each (so the engine's MoE parameter groups,
ZeRO's expert-data-parallel reduction and the one-file-per-expert checkpoints are unchanged); their weights are
stacked into ``[E, out, in]`` tensors for the call (``torch.stack``: one copy of the local expert weights per
forward, whose backward is a view per expert).  bench/moe_layer.py measures both paths side by side.

``grouped_mm`` needs every row stride to be a multiple of 16 bytes (D and F multiples of 8 in bf16, of 4 in fp32);
on CUDA it is a fused kernel for bf16 on sm80+ (Hopper's is the fast one), on the CPU a reference loop inside
torch, so ``"auto"`` picks it only for bf16 on CUDA devices of compute capability 9.0 or more.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn



def grouped_supported(x: torch.Tensor, hidden_size: int, ffn_rows: int) -> bool:
    """Whether ``grouped_mm`` accepts these shapes and this dtype (16-byte row strides)."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per = 16 // x.element_size()
    return hidden_size % per == 0 and ffn_rows % per == 0


def use_grouped(impl: str, x: torch.Tensor, hidden_size: int, ffn_rows: int) -> bool:
    """``impl`` resolved for this input: "grouped" (refused with a one-line error where unsupported), "loop",
    or "auto" = grouped only for bf16 on CUDA with compute capability >= 9.0."""
    if impl == "loop":
        return False
    ok = grouped_supported(x, hidden_size, ffn_rows)
    if impl == "grouped":
        if not ok:
            raise ValueError(f"--moe-expert-impl grouped needs torch.nn.functional.grouped_mm and the hidden size "
                             f"({hidden_size}) and expert FFN rows ({ffn_rows}) divisible by "
                             f"{16 // x.element_size()} for {x.dtype}; use --moe-expert-impl loop")
        return True
    return (ok and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def _stack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(params))


def grouped_experts(experts: nn.ModuleList, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """All local experts (`ExpertMLP`s) on their rows of ``x_MD`` (sorted by expert, ``counts_E`` each, a device
    tensor), as two grouped GEMMs.  Equal to ``cat([expert(x) for expert, x in zip(experts, split(x_MD,
    counts))])``."""
    M = x_MD.shape[0]
    first = experts[0]
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    w1_EFD = _stack(e.fc1.weight for e in experts)  # [E, F1, D]
    w2_EDF = _stack(e.fc2.weight for e in experts)  # [E, D, F]
    h_MF = F.grouped_mm(x_MD, w1_EFD.transpose(1, 2), offs=offs)
    has_bias = first.fc1.bias is not None
    if has_bias:
        expert_M = torch.repeat_interleave(torch.arange(len(experts), device=x_MD.device), counts_E, output_size=M)
        h_MF = h_MF + _stack(e.fc1.bias for e in experts).index_select(0, expert_M)
    h_MF = first.drop(first.act(h_MF))
    y_MD = F.grouped_mm(h_MF, w2_EDF.transpose(1, 2), offs=offs)
    if has_bias:
        y_MD = y_MD + _stack(e.fc2.bias for e in experts).index_select(0, expert_M)
    return y_MD
