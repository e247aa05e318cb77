"""Export: a checkpoint as one framework-neutral file (``tools/export_checkpoint.py`` is its command line).

All weights and buffers (every expert of every MoE layer gathered, expert parallelism 1) go into
``FILE.safetensors``, the model config into ``FILE.json``.  ``read.load_exported`` rebuilds the model; any reader of
safetensors (numpy, JAX, Rust) can read the tensors, named as the PyTorch modules name them.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .layout import CheckpointError
from .read import load_for_inference


def export_safetensors(load_dir: str, tag: Optional[str], out: str) -> Dict[str, int]:
    """Write ``out`` (``.safetensors``) and its ``.json`` beside it; returns {"tensors", "parameters"}."""
    from safetensors.torch import save_file

    if not out.endswith(".safetensors"):
        raise CheckpointError(f"--out {out} must end in .safetensors: name the file like model.safetensors")
    model, cfg, tag = load_for_inference(load_dir, tag)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen = {}
    for k, v in list(state.items()):  # tied weights: safetensors refuses shared storage, store copies
        key = (v.data_ptr(), v.shape, v.stride())
        if v.numel() and key in seen:
            state[k] = v.clone()
        seen[key] = k
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.join(load_dir, tag)})
    os.replace(tmp, out)
    meta = {"model_config": cfg.to_dict(), "source": os.path.abspath(os.path.join(load_dir, tag)),
            "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return {"tensors": meta["tensors"], "parameters": meta["parameters"]}
