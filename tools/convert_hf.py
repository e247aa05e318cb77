#!/usr/bin/env python
"""Import a Hugging Face MoE checkpoint (OlmoeForCausalLM) as a driver checkpoint.

    python tools/convert_hf.py --hf-dir OLMoE-1B-7B-0924 --out-dir runs/olmoe [--ep-size N] [--tokenizer DIR]

Reads the folder save_pretrained wrote (config.json, model.safetensors or its shards; per-expert or fused 3-D
expert tensors; OLMoE, or a VQMoE exported by tools/export_checkpoint.py --format hf, whose remote code is not run:
its weights and settings are read as data, after every file is checked against its vqmoe_manifest.json) and writes OUT/checkpoints/imported, OUT/config.json (the resolved configuration the drivers
read with --config-file) and OUT/tokenizer/.  pretrain_vqmoe.py --load OUT/checkpoints (on N ranks with
--config-file OUT/config.json), finetune_vqmoe.py --load OUT, tools/convert_to_vqmoe.py --load OUT,
tools/analyze_routing.py --load OUT and tools/embed.py --load OUT read it.  Every input is checked before
anything is written; see vqmoe_ds/checkpoint/hf.py for the key mapping.
"""
import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True, help="the Hugging Face model folder (config.json, *.safetensors)")
    ap.add_argument("--out-dir", required=True, help="a new folder for the checkpoint, config.json and tokenizer")
    ap.add_argument("--ep-size", type=int, default=1,
                    help="expert-parallel size (and world size) the checkpoint is laid out for (default 1)")
    ap.add_argument("--tokenizer", help="tokenizer.json (or its folder) when --hf-dir has none")
    return ap.parse_args(argv)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def convert(args):
    from vqmoe_ds.checkpoint.hf import import_hf
    from vqmoe_ds.training.lm import resolved_config_for

    out = import_hf(args.hf_dir, args.out_dir, args.ep_size, args.tokenizer, run_config=resolved_config_for)
    if out["verified"]:
        print(f"{args.hf_dir}: every file matches its SHA-256 in vqmoe_manifest.json (an export of vqmoe-ds)", flush=True)
    print(f"imported {out['architecture']} ({out['router']} router, {out['expert_layout']} experts, "
          f"{_count(out['parameters'])} parameters, {_count(out['active'])} active) -> {out['checkpoint']} for "
          f"{args.ep_size} rank(s)", flush=True)
    if out["tokenizer"]:
        print(f"tokenizer: {out['tokenizer']}", flush=True)
    else:
        print(f"notice: {args.hf_dir} has no tokenizer.json: the tools read text as bytes unless you convert again "
              f"with --tokenizer PATH/tokenizer.json (the model's own tokenizer)", flush=True)
    return out


def main(argv=None):
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.data import DataError
    from vqmoe_ds.training.launch import run_tool

    return run_tool(convert, parse(argv), (CheckpointError, DataError, FileNotFoundError))


def cli() -> None:
    """The console script ``vqmoe-convert-hf`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
