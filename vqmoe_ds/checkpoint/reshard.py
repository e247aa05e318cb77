"""Resharding: a checkpoint converted to another data-parallel world size and expert-parallel size
(``tools/reshard_checkpoint.py`` is its command line).

It writes a complete checkpoint in the crash-safe layout (``layout.py``) that the drivers resume with ``--load``
at the new world size and ``--moe-expert-parallel-size``.

What is converted:
  * model weights exactly: the dense module file is kept, and every expert file (DeepSpeed names them by global
    expert id, whatever the ep size) is checked to hold the weights of the expert its name gives -- the key's
    expert id and MoE layer against the file name (the wrong-expert load of DeepSpeed #6589) -- then copied;
  * step, lr-scheduler position, best validation metric, skipped-step count;
  * the data position: the number of samples (GPT) / segments (Transformer-XL) consumed, re-split over the new
    ranks (exact for GPT when the old world times the position divides by the new world, else rounded down);
  * per-rank state: target rank r gets the module buffers of source rank r mod (source world), its RNG states
    when r < source world (other ranks keep the driver's seeding), its task state (Transformer-XL memory) only
    when the world size is unchanged.
What is not: the optimizer state (ZeRO's flat partitions depend on the world size).  The written checkpoint is
marked ``"resharded"``; the driver then loads module weights and scheduler but starts the optimizer (Adam
moments) fresh, and says so.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..models import ModelConfig
from ..moe.config import MoEConfig
from ..parallel import init_single_process
from .layout import (EXPERT_FILE, EXPERT_KEY, MARKER, MODEL_FILE, TMP_PREFIX, CheckpointError, digests, expert_file,
                     fsync_dir, fsync_file, list_files, rank_file, resolve, verify, write_atomic)
from .states import check_files, read_states, save_states

NOTICE = ("notice: the optimizer state (Adam moments, ZeRO partitions) is not converted: the driver resumes this "
          "checkpoint with a freshly initialised optimizer (model weights, step, lr schedule and data position are "
          "kept)")


def moe_prefixes(cfg):
    """Module names of the model's MoE layers in DeepSpeed's layer order, and each expert's parameter names."""
    from deepspeed.moe.layer import MoE

    from ..models import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            expert0 = module.deepspeed_moe.experts.deepspeed_experts[0]
            layers.append((name, module.num_experts, sorted(n for n, _ in expert0.named_parameters())))
    buffers = [n for n, _ in model.named_buffers() if ".deepspeed_experts." in n]
    return layers, buffers


def check_expert_file(path, layer, expert, prefix, names):
    """The file ``layer_{layer}_expert_{expert}`` must hold exactly expert ``expert`` of MoE layer ``prefix``."""
    name = os.path.basename(path)
    state = read_states(path)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no expert weights: restore it from the run's save folder")
    found = []
    for key in state:
        m = EXPERT_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{name} holds key {key}, which names no expert: the file is not a DeepSpeed expert "
                                  f"file; restore it from the run's save folder")
        if m.group(1) != prefix or int(m.group(2)) != expert:
            raise CheckpointError(f"{name} holds {key} (expert {m.group(2)} of {m.group(1)}), but its name says expert "
                                  f"{expert} of MoE layer {layer} ({prefix}): the experts are mixed up (DeepSpeed "
                                  f"#6589); re-save the source checkpoint with the run that made it")
        found.append(m.group(3))
    if sorted(found) != names:
        raise CheckpointError(f"{name} holds parameters {sorted(found)}, the model's experts have {names}: the "
                              f"checkpoint is of another architecture or damaged; restore the file")
    return state


def reshard(load_dir, tag, out_dir, out_tag, world, ep):
    """Write the resharded checkpoint; returns its folder.  Raises CheckpointError with a one-line message."""
    if world < 1 or ep < 1:
        raise CheckpointError(f"--world-size {world} and --ep-size {ep} must both be >= 1")
    load_dir, tag = resolve(load_dir, tag)
    marker = verify(load_dir, tag)
    check_files(load_dir, tag, marker)
    src = os.path.join(load_dir, tag)
    model_state = read_states(os.path.join(src, MODEL_FILE))
    cfg_dict = dict(marker.get("model_config") or model_state.get("model_config") or {})
    if not cfg_dict:
        raise CheckpointError(f"checkpoint {src} records no model config: it was not written by a vqmoe-ds driver or "
                              f"tool")
    moe = dict(cfg_dict.get("moe") or {})
    one_process = {**cfg_dict, "moe": {**moe, "ep_size": 1}} if moe else cfg_dict
    model_cfg = ModelConfig.from_dict(one_process)
    n_exp = int(moe.get("num_experts") or 0) if model_cfg.is_moe else 0  # a dense router keeps num_experts unused
    if ep > 1 and not n_exp:
        raise CheckpointError(f"--ep-size {ep}: checkpoint {src} has a dense model without experts; use "
                                   f"--ep-size 1")
    if n_exp and n_exp % ep:
        raise CheckpointError(f"--ep-size {ep} does not divide the {n_exp} experts of checkpoint {src}: choose a "
                                   f"divisor of {n_exp}")
    if world % ep:
        raise CheckpointError(f"--ep-size {ep} does not divide --world-size {world}: give a world size that is a "
                                   f"multiple of the ep size")
    src_world = int(marker.get("world_size") or model_state.get("world_size") or 1)
    out_tag = out_tag or tag
    final = os.path.join(out_dir, out_tag)
    if os.path.abspath(final) == os.path.abspath(src) or os.path.exists(final):
        raise CheckpointError(f"{final} already exists: give another --out folder or --out-tag")

    # the experts: every file must hold the expert its name gives, of the MoE layer its name gives
    init_single_process()
    layers, expert_buffers = moe_prefixes(model_cfg)
    if expert_buffers:
        raise CheckpointError(f"expert buffers ({expert_buffers[0]}) are per-ep-rank state this tool does not "
                                   f"convert: resume at the source's ep size")
    expected = {expert_file(layer, e)
                for layer, (_, n, _) in enumerate(layers) for e in range(n)}
    present = {f for f in marker["files"] if EXPERT_FILE.match(f)}
    if present != expected:
        odd = sorted(expected - present) or sorted(present - expected)
        raise CheckpointError(f"checkpoint {src} {'lacks' if expected - present else 'has the extra file'} "
                                   f"{odd[0]} for its model ({len(layers)} MoE layers of {n_exp} experts): "
                                   f"load another tag")
    for layer, (prefix, n, names) in enumerate(layers):
        for e in range(n):
            check_expert_file(os.path.join(src, expert_file(layer, e)), layer, e,
                              prefix, names)

    # the dense file: weights and scheduler kept, optimizer dropped, client state re-split
    info = {"from_world_size": src_world, "from_ep_size": int(MoEConfig.from_settings(moe).ep_size),
            "world_size": world, "ep_size": ep, "source": os.path.abspath(src), "optimizer": "fresh"}
    cfg_out = {**cfg_dict, "moe": {**moe, "ep_size": ep}} if moe else cfg_dict
    model_state["optimizer"] = None
    model_state["param_shapes"] = None  # the old ZeRO partitions' shapes; no optimizer files go with this checkpoint
    model_state["dp_world_size"] = world
    model_state["world_size"] = world
    model_state.pop("model_config", None)  # the marker holds it (a source of the earlier format kept it here too)
    model_state["resharded"] = info
    if isinstance(model_state.get("data"), dict) and "index" in model_state["data"]:
        data = dict(model_state["data"])
        data["index"] = int(data["index"]) * src_world // world  # consumed per rank * old ranks / new ranks
        model_state["data"] = data

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, TMP_PREFIX + out_tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_states(model_state, os.path.join(tmp, MODEL_FILE))
    for name in sorted(expected):
        shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    for r in range(world):
        s = r % src_world
        path = os.path.join(src, rank_file(s))
        state = read_states(path) if os.path.isfile(path) else {"rng": None, "task": None, "buffers": None}
        save_states({"rng": state.get("rng") if r < src_world else None,
                    "task": state.get("task") if world == src_world else None,
                    "buffers": state.get("buffers")}, os.path.join(tmp, rank_file(r)))
    files = list_files(tmp)
    for name in files:
        fsync_file(os.path.join(tmp, name))
    run_config = marker.get("config")
    if run_config and moe:
        run_config = {**run_config, "moe": {**run_config.get("moe", {}), "ep_size": ep}}
    out_marker = {"tag": out_tag, "step": marker.get("step"), "world_size": world, "files": files,
                  "sha256": digests(tmp, list(files)), "model_config": cfg_out, "config": run_config,
                  "resharded": info}
    if marker.get("imported"):  # weights only (tools/convert_hf.py): the driver loads them without any run state
        out_marker["imported"] = marker["imported"]
    write_atomic(os.path.join(tmp, MARKER), json.dumps(out_marker, indent=1))
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    write_atomic(os.path.join(out_dir, "latest"), out_tag)
    verify(out_dir, out_tag)
    return final
