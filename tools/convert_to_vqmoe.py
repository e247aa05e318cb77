#!/usr/bin/env python
"""Training-free VQMoE: turn a pretrained top-k SMoE checkpoint into a VQMoE checkpoint, with no training.

    python tools/convert_to_vqmoe.py --load runs/topk --out-dir runs/topk_vq --distance l2 --eval

Each MoE layer gets a codebook of K = N codes initialised from its router's expert embeddings (rows of W_e;
code i -> expert i) and a mixing gate W_g = 0 with bias (0, b): ``--discrete-share 0`` (default) sets b = -1e4,
so g_d = 0 exactly and the converted model computes the source's outputs; ``--discrete-share p`` mixes p of
the code's expert into every token.  The source's router options (z-loss, renormalisation, expert bias, ...)
go to the continuous path unchanged and are listed.

Writes OUT/checkpoints/converted (the driver's checkpoint format, laid out for ``--ep-size`` ranks; marked as a
start, like an import: ``pretrain_vqmoe.py --config-file OUT/config.json --load OUT/checkpoints`` continues
training from it with a fresh optimizer and lr schedule at step 0), OUT/config.json (the drivers' resolved
configuration of the converted model, run.out_dir = OUT) and OUT/tokenizer/ (the source's tokenizer, so every
tool decodes the converted model as the source).  ``--eval`` reports the held-out loss / BPC / perplexity of the
source, the converted model and its discrete-only view (eq. 7) on the run's own data or ``--data-path``, and the
largest logit difference between source and converted model, into OUT/conversion.json.  Every input (the source,
the options, the data of --eval) is checked before anything is written.
"""
import argparse
import json
import os
import shutil

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

import torch  # noqa: E402

from vqmoe_ds.data import DataError  # noqa: E402
from vqmoe_ds.finetune.convert import (carried_options, conversion_notices, convert_state, gate_bias,  # noqa: E402
                                       vqmoe_config)
from vqmoe_ds.checkpoint import CheckpointError, StrictRemap, load_lm, minimal_ds_config, read_run  # noqa: E402
from vqmoe_ds.finetune.discrete import absent_path_keys, discrete_only_config  # noqa: E402
from vqmoe_ds.moe.config import ConfigError  # noqa: E402

TAG = "converted"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", required=True, help="top-k SMoE run: its --out-dir, checkpoints folder or a tag folder")
    ap.add_argument("--tag", help="default: the folder's latest")
    ap.add_argument("--run-config", help="the source run's config.json if not beside its checkpoints folder")
    ap.add_argument("--out-dir", required=True, help="a new folder: checkpoints/converted, config.json, tokenizer/")
    ap.add_argument("--distance", choices=("l2", "cosine"), default="l2", help="codebook distance")
    ap.add_argument("--discrete-share", type=float, default=0.0, help="g_d of every token; 0: discrete path off")
    ap.add_argument("--ep-size", type=int, default=1,
                    help="expert-parallel size (and world size) the checkpoint is laid out for (default 1)")
    ap.add_argument("--eval", action="store_true", help="held-out loss of source, converted and discrete-only")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--eval-iters", type=int, default=20, help="batches (0: the whole split)")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--data-path", help="evaluate on this preprocessed data (PREFIX of tools/preprocess_data.py) "
                                        "instead of the run's own")
    ap.add_argument("--text-file", help="evaluate on this text (bytes, split 90/5/5): byte-level models only")
    return ap.parse_args(argv)


def resolved_config(run, cfg, out_dir, meta):
    """The source run's resolved configuration with the converted model, this folder as its out_dir (no save or load
    of the source's), and a record of the conversion; --config-file reads it back."""
    rc = json.loads(json.dumps(run.run_config or {}, default=str))
    rc["model"] = {k: v for k, v in cfg.to_dict().items() if k != "moe"}
    rc["moe"] = cfg.moe.settings()
    if isinstance(rc.get("run"), dict):
        rc["run"].update(out_dir=out_dir, save=None, load=None, overwrite=False)
    if "config" in rc:
        rc["config"] = None  # the model and MoE sections spell everything out; no named shape applies
    rc["converted"] = {k: v for k, v in meta.items() if k != "hf_config"}
    return rc


def convert(args):
    import deepspeed

    from vqmoe_ds.checkpoint import store
    from vqmoe_ds.checkpoint.export import copy_tokenizer
    from vqmoe_ds.checkpoint.hf import spelled_out
    from vqmoe_ds.data.errors import require_output
    from vqmoe_ds.models import build_model

    # ---- every check first ------------------------------------------------------------------------------
    if os.path.exists(os.path.join(args.out_dir, "checkpoints")):
        raise CheckpointError(f"--out-dir {args.out_dir} already holds checkpoints/: give a new folder")
    require_output(args.out_dir, "--out-dir", "folder")
    gate_bias(args.discrete_share)  # checks the share before anything is built
    run = read_run(args.load, args.tag, args.run_config)
    src_cfg = run.model_config.replace_moe(ep_size=1)
    cfg = spelled_out(vqmoe_config(src_cfg, args.distance))
    E = cfg.moe.num_experts
    if args.ep_size < 1 or E % args.ep_size:
        raise CheckpointError(f"--ep-size {args.ep_size} does not divide the {E} experts: choose a divisor of {E}")
    corpus = None
    if args.eval:
        from vqmoe_ds.finetune.lm_eval import eval_corpus

        corpus = eval_corpus(run, args.data_path, args.text_file)
        if args.split not in corpus.streams:
            raise DataError(f"the data has no {args.split} split ({corpus.missing.get(args.split)}): choose --split "
                            f"{'test' if args.split == 'valid' else 'valid'}")
    carried = carried_options(src_cfg)
    origin = run.client_state.get("converted_from") or {}
    meta = {"format": "vqmoe-conversion", "source": run.path, "distance": args.distance,
            "discrete_share": args.discrete_share, "source_step": int(run.client_state.get("step", 0)),
            "from_import": origin.get("format") == "hf" or bool(origin.get("from_import")),
            "router_options": carried}
    if origin.get("hf_config"):
        meta["hf_config"] = origin["hf_config"]  # token ids etc. of an imported model, for the export
    # ---- convert and write ------------------------------------------------------------------------------
    src, run, _ = load_lm(args.load, args.tag, run_config=args.run_config, run=run)  # verified once, above
    torch.manual_seed(0)
    dst = build_model(cfg)
    dst.load_state_dict(convert_state(src.state_dict(), src_cfg, dst.state_dict(), args.discrete_share), strict=True)
    engine, _, _, _ = deepspeed.initialize(model=dst, config=minimal_ds_config())
    tok = copy_tokenizer(run.client_state.get("tokenizer"), os.path.join(args.out_dir, "tokenizer"))
    save_dir = os.path.join(args.out_dir, "checkpoints")
    rc = resolved_config(run, cfg, args.out_dir, meta)
    client = {"step": 0, "model_config": cfg.to_dict(), "world_size": 1, "converted_from": meta}
    if tok is not None:
        client["tokenizer"] = tok
    marker = {"imported": {"format": "vqmoe-conversion", "source": run.path}}  # weights only: a start, not a resume
    if args.ep_size == 1:
        store.save(engine, save_dir, TAG, client, config=rc, model=dst, step=0, marker_extra=marker)
        path = os.path.join(save_dir, TAG)
    else:  # saved at one rank, then laid out for ep_size ranks
        from vqmoe_ds.checkpoint.reshard import reshard

        staging = os.path.join(args.out_dir, ".staging")
        store.save(engine, staging, TAG, client, config=rc, model=dst, step=0, marker_extra=marker)
        path = reshard(staging, TAG, save_dir, TAG, args.ep_size, args.ep_size)
        shutil.rmtree(staging, ignore_errors=True)
        rc["moe"]["ep_size"] = args.ep_size
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(rc, f, indent=1, default=str)
    print(f"converted {run.path} -> {path} (K = N = {E} codes from W_e, {args.distance}, discrete share "
          f"{args.discrete_share}, {args.ep_size} rank(s))", flush=True)
    print("router options carried to the continuous path: " +
          (", ".join(f"{k}={v}" for k, v in carried.items()) or "the defaults"), flush=True)
    for line in conversion_notices(src_cfg, args.discrete_share):
        print(f"notice: {line}", flush=True)
    print(f"tokenizer: {tok['vocab_file'] if tok and tok.get('vocab_file') else (tok or {}).get('kind', 'none recorded')}",
          flush=True)
    out = {"conversion": {k: v for k, v in meta.items() if k != "hf_config"}, "checkpoint": path}
    if args.eval:
        out["eval"] = evaluate(args, corpus, src, dst, cfg)
    with open(os.path.join(args.out_dir, "conversion.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def evaluate(args, corpus, src, dst, cfg):
    from vqmoe_ds.finetune.lm_eval import held_out_loss
    from vqmoe_ds.models import build_model
    from vqmoe_ds.training.data import eval_batches

    kw = dict(split=args.split, batch_size=args.eval_batch_size, max_batches=args.eval_iters)
    res = {"source": held_out_loss(src, corpus, **kw), "converted": held_out_loss(dst, corpus, **kw)}
    d_cfg = discrete_only_config(cfg.replace_moe(ep_size=1), freeze_vq=True)
    torch.manual_seed(0)
    disc = build_model(d_cfg)  # the converted weights without what eq. 7 drops (continuous router, W_g)
    StrictRemap(may_drop=absent_path_keys(cfg, d_cfg), where="the converted model")(dst.state_dict(), disc)
    res["discrete_only"] = held_out_loss(disc.eval(), corpus, **kw)
    x, _, mask = next(eval_batches(corpus.streams[args.split], cfg.model, args.eval_batch_size, cfg.seq_len, 0, 1, 1))
    with torch.no_grad():  # over the real tokens of the first batch (its padding is masked)
        res["max_abs_logit_diff"] = float((src(x, None, None, mask)[0] - dst(x, None, None, mask)[0])[mask].abs().max())
    per_char = "bits_per_char" in res["source"]
    print(f"held-out {args.split} ({res['source']['tokens']} tokens): loss nats/token / bits/token"
          f"{' / bits/char' if per_char else ''} / token ppl", flush=True)
    for k in ("source", "converted", "discrete_only"):
        r = res[k]
        values = [f"{r['loss']:.4f}", f"{r['bits_per_token']:.4f}"]
        values += [f"{r['bits_per_char']:.4f}"] if per_char else []
        print(f"  {k:14s} {' / '.join(values + [format(r['token_ppl'], '.3f')])}", flush=True)
    print(f"  max |logit(source) - logit(converted)| = {res['max_abs_logit_diff']:.3g}", flush=True)
    return res


def main(argv=None):
    from vqmoe_ds.training.launch import run_tool

    return run_tool(convert, parse(argv), (CheckpointError, ConfigError, DataError, FileNotFoundError))


def cli() -> None:
    """The console script ``vqmoe-convert-to-vqmoe`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
