"""Export: a checkpoint as one framework-neutral file (``tools/export_checkpoint.py`` is its command line).

All weights and buffers (every expert of every MoE layer gathered, expert parallelism 1) go into
``FILE.safetensors``, the model config into ``FILE.json`` and the SHA-256 of both into ``FILE.sha256.json``
(`manifest`).  ``read.load_exported`` verifies the manifest and rebuilds the model; any reader of safetensors (numpy,
JAX, Rust) can read the tensors, named as the PyTorch modules name them.  `pick_tag` is the tag rule of the tools
that read a run's checkpoints: ``best`` unless a tag is given, else ``latest`` with a notice.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from .layout import BEST, CheckpointError
from .manifest import file_manifest_path, write_manifest


def pick_tag(load: str, tag: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(tag, notice): ``tag`` when given; otherwise ``best`` when the run has one, else None (``latest``) and a
    notice saying so (a run without a validation split saves no ``best``)."""
    from .layout import resolve

    if tag is not None:
        return tag, None
    try:
        resolve(load, BEST)
        return BEST, None
    except CheckpointError:
        save_dir, latest = resolve(load, None)
        return None, (f"notice: {save_dir} has no '{BEST}' checkpoint (a run saves one when it validates): using "
                      f"the latest, {latest}")


def export_safetensors(load_dir: str, tag: Optional[str], out: str, overwrite: bool = False) -> Dict[str, int]:
    """Write ``out`` (``.safetensors``), its ``.json`` and its ``.sha256.json`` beside it; returns {"tensors",
    "parameters"}.  Existing files are replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    from .read import load_for_inference, read_run

    if not out.endswith(".safetensors"):
        raise CheckpointError(f"--out {out} must end in .safetensors: name the file like model.safetensors")
    meta_path, sums = os.path.splitext(out)[0] + ".json", file_manifest_path(out)
    existing = [p for p in (out, meta_path, sums) if os.path.exists(p)]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} exists: give another --out, or --overwrite to replace it")
    model, cfg, tag = load_for_inference(load_dir, tag)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen = {}
    for k, v in list(state.items()):  # tied weights: safetensors refuses shared storage, store copies
        key = (v.data_ptr(), v.shape, v.stride())
        if v.numel() and key in seen:
            state[k] = v.clone()
        seen[key] = k
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = out + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.join(load_dir, tag)})
    os.replace(tmp, out)
    tokenizer = read_run(load_dir, tag).client_state.get("tokenizer")
    meta = {"model_config": cfg.to_dict(), "source": os.path.abspath(os.path.join(load_dir, tag)),
            "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values())),
            "tokenizer": {k: v for k, v in (tokenizer or {}).items() if k != "vocab_file"} or None}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    write_manifest(sums, folder, [os.path.basename(out), os.path.basename(meta_path)])
    return {"tensors": meta["tensors"], "parameters": meta["parameters"]}
