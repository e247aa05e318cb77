"""Upcycling (Komatsuzaki et al. 2023; Megatron-core's ``--moe-use-upcycling``): an MoE / VQMoE model starts from a
dense checkpoint, every expert of a layer a copy of that layer's dense FFN (``pretrain_vqmoe.py --upcycle-from``).

Everything the dense model has is copied by name (embeddings, attention, norms, the dense FFNs of layers that stay
dense); each MoE layer's experts get the dense FFN of their layer (``blocks.{i}.ffn.mlp.*``); what the dense
model lacks keeps its initialisation: the routers, VQMoE's codebook and mixing gate, a shared expert.  With
identical experts an MoE layer computes sum_k w_k FFN(x), so the upcycled model computes the dense model's
outputs exactly when the combine weights of each token sum to 1 (renormalised top-k, ``norm_topk_prob``, or
top-1 with a router that gives its expert weight 1) and no route is dropped; VQMoE's discrete path adds
g_d FFN(x~), a different input, so a VQMoE model starts close to, not at, the dense one.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ..models import ModelConfig
from .layout import EXPERT_KEY, MODEL_FILE, CheckpointError
from .read import PretrainedRun, read_run
from .states import read_states

SAME_SHAPE_FIELDS = ("model", "vocab_size", "n_layer", "n_head", "d_model", "seq_len", "mem_len", "tie_embeddings",
                     "normalization", "norm_epsilon", "swiglu", "position_embedding_type", "rotary_base", "qk_norm",
                     "add_bias_linear")


def check_upcycle(cfg: ModelConfig, path: str, tag: Optional[str] = None) -> PretrainedRun:
    """The dense run at ``path`` (verified), after checking that ``cfg``'s experts can start from its FFNs."""
    run = read_run(path, tag)
    dense = run.model_config
    where = f"--upcycle-from {path}"
    if dense.is_moe:
        raise CheckpointError(f"{where} holds an MoE model (router {dense.moe.router!r}): give the checkpoint "
                              f"of a dense model (--router dense)")
    if not cfg.is_moe:
        raise CheckpointError(f"{where}: this run's model is dense, there are no experts to upcycle: set --router "
                              f"and --num-experts")
    for name in SAME_SHAPE_FIELDS:
        a, b = getattr(dense, name), getattr(cfg, name)
        if a != b:
            raise CheckpointError(f"{where} was trained with {name}={a!r}, this run has {b!r}: use the dense model's "
                                  f"settings (its config.json)")
    for i in cfg.moe_layer_ids():
        m, d = cfg.moe_config(i), dense.moe_config(i)
        if m.ffn_hidden_size != d.ffn_hidden_size:
            raise CheckpointError(f"{where}: its FFN width is {d.ffn_hidden_size}, this run's experts have "
                                  f"{m.ffn_hidden_size}: set --expert-ffn-hidden-size {d.ffn_hidden_size}")
        if m.activation != d.activation:
            raise CheckpointError(f"{where}: its FFN uses {d.activation}, this run's experts {m.activation}: set "
                                  f"--moe-activation {d.activation}")
    return run


def upcycle(model: torch.nn.Module, run: PretrainedRun) -> Dict[str, Any]:
    """Copy the dense run's weights into ``model`` (this rank's experts, any ep size); returns what was copied and
    what kept its initialisation."""
    state = read_states(os.path.join(run.path, MODEL_FILE))
    src = state.get("module") or {}
    dst = model.state_dict()
    used, experts, kept, new = set(), 0, [], {}
    for key, value in dst.items():
        m = EXPERT_KEY.match(key)
        if m is not None:  # blocks.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{j}.{name} <- blocks.{i}.ffn.mlp.{name}
            source = m.group(1).rsplit(".moe", 1)[0] + ".mlp." + m.group(3)
            experts += 1
        else:
            source = key
        if source not in src:
            kept.append(key)
            continue
        if tuple(src[source].shape) != tuple(value.shape):
            raise CheckpointError(f"--upcycle-from {run.path}: {source} has shape {tuple(src[source].shape)}, this "
                                  f"model's {key} {tuple(value.shape)}: use the dense model's settings")
        new[key] = src[source].to(value.dtype)
        used.add(source)
    unused = sorted(k for k in src if k not in used)
    if unused:
        raise CheckpointError(f"--upcycle-from {run.path}: {unused[0]} ({len(unused)} tensor(s)) has no place in this "
                              f"model: use the dense model's settings")
    model.load_state_dict(new, strict=False)
    return {"source": run.path, "copied": len(new), "expert_tensors": experts, "kept_init": kept}
