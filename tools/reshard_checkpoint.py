#!/usr/bin/env python
"""Convert a checkpoint of pretrain_vqmoe.py to another data-parallel world size and expert-parallel size.

    python tools/reshard_checkpoint.py --load runs/a/checkpoints [--tag latest] --out runs/b/checkpoints \\
        --world-size 1 --ep-size 1

writes a complete checkpoint (the crash-safe layout of docs/checkpoints.md: DeepSpeed's files, one per expert,
``rank{r}_state.pt`` for every target rank, ``vqmoe_complete.json``, ``latest``) that ``pretrain_vqmoe.py --load``
resumes at ``--world-size`` ranks with ``--moe-expert-parallel-size EP``.

What is converted:
  * model weights exactly: the dense module file is kept, and every expert file (DeepSpeed names them by global
    expert id, whatever the ep size) is checked to hold the weights of the expert its name gives -- the key's
    expert id and MoE layer against the file name (the wrong-expert load of DeepSpeed #6589) -- then copied;
  * step, lr-scheduler position, best validation loss, skipped-step count;
  * the data position: the number of samples (GPT) / segments (Transformer-XL) consumed, re-split over the new
    ranks (exact for GPT when the old world times the position divides by the new world, else rounded down);
  * per-rank state: target rank r gets the module buffers of source rank r mod (source world), its RNG states
    when r < source world (other ranks keep the driver's seeding), its Transformer-XL memory only when the
    world size is unchanged.
What is not: the optimizer state (ZeRO's flat partitions depend on the world size).  The written checkpoint is
marked ``"resharded"``; the driver then loads module weights and scheduler but starts the optimizer
(Adam moments) fresh, and says so.
"""
import argparse
import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")
NOTICE = ("notice: the optimizer state (Adam moments, ZeRO partitions) is not converted: the driver resumes this "
          "checkpoint with a freshly initialised optimizer (model weights, step, lr schedule and data position are "
          "kept)")


def moe_prefixes(cfg):
    """Module names of the model's MoE layers in DeepSpeed's layer order, and each expert's parameter names."""
    import torch
    from deepspeed.moe.layer import MoE

    from vqmoe_ds.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            expert0 = module.deepspeed_moe.experts.deepspeed_experts[0]
            layers.append((name, module.num_experts, sorted(n for n, _ in expert0.named_parameters())))
    buffers = [n for n, _ in model.named_buffers() if ".deepspeed_experts." in n]
    return layers, buffers


def check_expert_file(path, layer, expert, prefix, names, torch):
    """The file ``layer_{layer}_expert_{expert}`` must hold exactly expert ``expert`` of MoE layer ``prefix``."""
    from vqmoe_ds.training.checkpoint import CheckpointError

    name = os.path.basename(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}): restore it from the run's save folder")
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
    import torch

    from vqmoe_ds.models import ModelConfig
    from vqmoe_ds.training import checkpoint as ckpt

    if world < 1 or ep < 1:
        raise ckpt.CheckpointError(f"--world-size {world} and --ep-size {ep} must both be >= 1")
    tag = ckpt.resolve_tag(load_dir, tag)
    marker = ckpt.verify(load_dir, tag)
    src = os.path.join(load_dir, tag)
    model_state = torch.load(os.path.join(src, MODEL_FILE), map_location="cpu", weights_only=False)
    cfg_dict = dict(marker.get("model_config") or model_state["model_config"])
    moe = dict(cfg_dict.get("moe") or {})
    n_exp = int(moe.get("num_experts") or 0)
    if ep > 1 and not n_exp:
        raise ckpt.CheckpointError(f"--ep-size {ep}: checkpoint {src} has a dense model without experts; use "
                                   f"--ep-size 1")
    if n_exp and n_exp % ep:
        raise ckpt.CheckpointError(f"--ep-size {ep} does not divide the {n_exp} experts of checkpoint {src}: choose a "
                                   f"divisor of {n_exp}")
    if world % ep:
        raise ckpt.CheckpointError(f"--ep-size {ep} does not divide --world-size {world}: give a world size that is a "
                                   f"multiple of the ep size")
    src_world = int(marker.get("world_size") or model_state.get("world_size") or 1)
    out_tag = out_tag or tag
    final = os.path.join(out_dir, out_tag)
    if os.path.abspath(final) == os.path.abspath(src) or os.path.exists(final):
        raise ckpt.CheckpointError(f"{final} already exists: give another --out folder or --out-tag")

    # the experts: every file must hold the expert its name gives, of the MoE layer its name gives
    ckpt._single_process_group()
    one_process = {**cfg_dict, "moe": {**moe, "ep_size": 1}} if moe else cfg_dict
    layers, expert_buffers = moe_prefixes(ModelConfig(**one_process))
    if expert_buffers:
        raise ckpt.CheckpointError(f"expert buffers ({expert_buffers[0]}) are per-ep-rank state this tool does not "
                                   f"convert: resume at the source's ep size")
    expected = {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
                for layer, (_, n, _) in enumerate(layers) for e in range(n)}
    present = {f for f in marker["files"] if EXPERT_FILE.match(f)}
    if present != expected:
        odd = sorted(expected - present) or sorted(present - expected)
        raise ckpt.CheckpointError(f"checkpoint {src} {'lacks' if expected - present else 'has the extra file'} "
                                   f"{odd[0]} for its model ({len(layers)} MoE layers of {n_exp} experts): "
                                   f"load another tag")
    for layer, (prefix, n, names) in enumerate(layers):
        for e in range(n):
            check_expert_file(os.path.join(src, f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"), layer, e,
                              prefix, names, torch)

    # the dense file: weights and scheduler kept, optimizer dropped, client state re-split
    info = {"from_world_size": src_world, "from_ep_size": int(moe.get("ep_size", 1)), "world_size": world,
            "ep_size": ep, "source": os.path.abspath(src), "optimizer": "fresh"}
    cfg_out = {**cfg_dict, "moe": {**moe, "ep_size": ep}} if moe else cfg_dict
    model_state["optimizer"] = None
    model_state["param_shapes"] = None  # the old ZeRO partitions' shapes; no optimizer files go with this checkpoint
    model_state["dp_world_size"] = world
    model_state["world_size"] = world
    model_state["model_config"] = cfg_out
    model_state["resharded"] = info
    if isinstance(model_state.get("data"), dict) and "index" in model_state["data"]:
        data = dict(model_state["data"])
        data["index"] = int(data["index"]) * src_world // world  # consumed per rank * old ranks / new ranks
        model_state["data"] = data

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ckpt.TMP_PREFIX + out_tag)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(model_state, os.path.join(tmp, MODEL_FILE))
    for name in sorted(expected):
        shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    for r in range(world):
        s = r % src_world
        path = os.path.join(src, f"rank{s}_state.pt")
        state = torch.load(path, weights_only=False) if os.path.isfile(path) else {"rng": None, "mems": None,
                                                                                  "buffers": None}
        torch.save({"rng": state.get("rng") if r < src_world else None,
                    "mems": state.get("mems") if world == src_world else None,
                    "buffers": state.get("buffers")}, os.path.join(tmp, f"rank{r}_state.pt"))
    files = ckpt._list_files(tmp)
    for name in files:
        ckpt._fsync_file(os.path.join(tmp, name))
    out_marker = {"tag": out_tag, "step": marker.get("step"), "world_size": world, "files": files,
                  "model_config": cfg_out, "resharded": info}
    ckpt._write_atomic(os.path.join(tmp, ckpt.MARKER), json.dumps(out_marker, indent=1))
    ckpt._fsync_dir(tmp)
    os.replace(tmp, final)
    ckpt._fsync_dir(out_dir)
    ckpt._write_atomic(os.path.join(out_dir, "latest"), out_tag)
    ckpt.verify(out_dir, out_tag)
    return final


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the --save folder of a run")
    p.add_argument("--tag", default="latest", help="latest (default), step<N> or best")
    p.add_argument("--out", required=True, help="the folder to write the resharded checkpoint to (a --load folder)")
    p.add_argument("--out-tag", default=None, help="tag of the written checkpoint (default: the source's tag)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks that will resume from it")
    p.add_argument("--ep-size", type=int, required=True, help="--moe-expert-parallel-size of the resumed run")
    args = p.parse_args(argv)
    from vqmoe_ds.training import checkpoint as ckpt

    try:
        path = reshard(args.load, args.tag, args.out, args.out_tag, args.world_size, args.ep_size)
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} for {args.world_size} rank(s), ep size {args.ep_size}; resume with --load {args.out} "
          f"--moe-expert-parallel-size {args.ep_size}")
    print(NOTICE)
    return 0


if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
