#!/usr/bin/env python
"""Export a checkpoint of pretrain_vqmoe.py to one framework-neutral file: all weights and buffers (every
expert of every MoE layer gathered, expert parallelism 1) in safetensors, plus the model config as JSON.

    python tools/export_checkpoint.py --load runs/demo/checkpoints [--tag best] --out runs/demo/model.safetensors

writes ``model.safetensors``, ``model.json`` and ``model.sha256.json`` (size and SHA-256 of both, which every reader
checks).  ``tools/generate.py --weights model.safetensors`` samples from it; ``vqmoe_ds.checkpoint.load_exported``
rebuilds the model.  Any reader of safetensors (numpy, JAX, Rust) can read the tensors; their names are those of
the PyTorch modules.

    python tools/export_checkpoint.py --format hf --load runs/olmoe/checkpoints --tag latest --out runs/olmoe/hf

writes a Hugging Face folder (config.json, model.safetensors or shards, the tokenizer of an imported model,
vqmoe_manifest.json with every file's SHA-256) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
a top-k model of OLMoE's block as ``OlmoeForCausalLM``; a VQMoE model of OLMoE's block (e.g. converted with
tools/convert_to_vqmoe.py) as ``VQMoEOlmoeForCausalLM`` from the ``configuration_vqmoe.py`` / ``modeling_vqmoe.py``
written into the folder, which needs ``trust_remote_code=True``.  ``tools/convert_hf.py`` reads either back.

Without --tag the ``best`` checkpoint is exported, or ``latest`` (with a notice) when the run saved no best.  An
existing --out is replaced only with --overwrite.
"""
import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see tools/export_checkpoint.py --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the --save folder of a run (or its --out-dir)")
    p.add_argument("--tag", help="best, step<N> or latest (default: best, else latest with a notice)")
    p.add_argument("--out", required=True, help="FILE.safetensors (FILE.json is written beside it); --format hf: a folder")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors (default): one file named as our modules; hf: a Hugging Face folder "
                        "(OlmoeForCausalLM, or VQMoE with trust_remote_code)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.checkpoint.export import export_safetensors, pick_tag
    from vqmoe_ds.data.errors import DataError, require_output
    from vqmoe_ds.parallel import shutdown

    try:
        tag, notice = pick_tag(args.load, args.tag)
        if notice:
            print(notice, flush=True)
        if args.format == "hf":
            from vqmoe_ds.checkpoint.export import export_hf

            n = export_hf(args.load, tag, args.out, overwrite=args.overwrite)
        else:
            require_output(args.out, "--out", "file")
            n = export_safetensors(args.load, tag, args.out, overwrite=args.overwrite)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(clean=False)
    if args.format == "hf":
        remote = ", load it with trust_remote_code=True" if n["architecture"] != "OlmoeForCausalLM" else ""
        print(f"wrote {args.out} ({n['tensors']} tensors in {n['shards']} file(s), {n['architecture']}{remote}; "
              f"checksums in vqmoe_manifest.json)")
        if n["notice"]:
            print(f"notice: {n['notice']}")
    else:
        stem = os.path.splitext(args.out)[0]
        print(f"wrote {args.out} ({n['tensors']} tensors), {stem}.json and {stem}.sha256.json")
    return 0


def cli() -> None:
    """The console script ``vqmoe-export-checkpoint`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
