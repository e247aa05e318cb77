#!/usr/bin/env python
"""Training-free VQMoE: turn a pretrained top-k SMoE checkpoint into a VQMoE checkpoint, with no training.

    python tools/convert_to_vqmoe.py --load runs/topk --out-dir runs/topk_vq --distance l2 --eval

Each MoE layer gets a codebook of K = N codes initialised from its router's expert embeddings (rows of W_e;
code i -> expert i) and a mixing gate W_g = 0 with bias (0, b): ``--discrete-share 0`` (default) sets b = -1e4,
so g_d = 0 exactly and the converted model computes the source's outputs; ``--discrete-share p`` mixes p of
the code's expert into every token.  Writes OUT/checkpoints/converted (the driver's checkpoint format, usable by
finetune_vqmoe.py, tools/analyze_routing.py and tools/embed.py) and OUT/config.json.  ``--eval`` reports the
held-out loss / BPC / perplexity of the source, the converted model and its discrete-only view (eq. 7) on the
run's own data, and the largest logit difference between source and converted model, into OUT/conversion.json.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

import torch  # noqa: E402

from vqmoe_ds.data import DataError  # noqa: E402
from vqmoe_ds.finetune.convert import convert_state, gate_bias, vqmoe_config  # noqa: E402
from vqmoe_ds.checkpoint import CheckpointError, load_lm, minimal_ds_config, read_run  # noqa: E402
from vqmoe_ds.finetune.discrete import absent_path_keys, discrete_only_config  # noqa: E402
from vqmoe_ds.moe.config import ConfigError  # noqa: E402

TAG = "converted"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", required=True, help="top-k SMoE run: its --out-dir, checkpoints folder or a tag folder")
    ap.add_argument("--tag", help="default: the folder's latest")
    ap.add_argument("--run-config", help="the source run's config.json if not beside its checkpoints folder")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--distance", choices=("l2", "cosine"), default="l2", help="codebook distance")
    ap.add_argument("--discrete-share", type=float, default=0.0, help="g_d of every token; 0: discrete path off")
    ap.add_argument("--eval", action="store_true", help="held-out loss of source, converted and discrete-only")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--eval-iters", type=int, default=20, help="batches (0: the whole split)")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--text-file", help="evaluate on this text (bytes, split 90/5/5) instead of the run's data")
    return ap.parse_args(argv)


def convert(args):
    import deepspeed

    from vqmoe_ds.data.errors import require_output
    from vqmoe_ds.models import build_model

    require_output(args.out_dir, "--out-dir", "folder")  # before any work
    from vqmoe_ds import checkpoint as ckpt

    gate_bias(args.discrete_share)  # checks the share before anything is built
    run = read_run(args.load, args.tag, args.run_config)
    src_cfg = run.model_config.replace(moe=dict(run.model_config.moe, ep_size=1))
    cfg = vqmoe_config(src_cfg, args.distance)
    src, run, _ = load_lm(args.load, args.tag, run_config=args.run_config)
    torch.manual_seed(0)
    dst = build_model(cfg)
    dst.load_state_dict(convert_state(src.state_dict(), src_cfg, dst.state_dict(), args.discrete_share), strict=True)
    engine, _, _, _ = deepspeed.initialize(model=dst, config=minimal_ds_config())
    save_dir = os.path.join(args.out_dir, "checkpoints")
    meta = {"source": run.path, "distance": args.distance, "discrete_share": args.discrete_share}
    rc = dict(run.run_config or {})
    rc.update(model={k: v for k, v in cfg.to_dict().items() if k != "moe"}, moe=dict(cfg.moe))
    ckpt.save(engine, save_dir, TAG, {"step": int(run.client_state.get("step", 0)), "model_config": cfg.to_dict(),
                                      "world_size": 1, "converted_from": meta}, config=rc)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(rc, f, indent=1, default=str)
    print(f"converted {run.path} -> {os.path.join(save_dir, TAG)} (K = N = {cfg.moe['num_experts']} codes from W_e, "
          f"{args.distance}, discrete share {args.discrete_share})", flush=True)
    out = {"conversion": meta, "checkpoint": os.path.join(save_dir, TAG)}
    if args.eval:
        out["eval"] = evaluate(args, run, src, dst, cfg)
    with open(os.path.join(args.out_dir, "conversion.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def evaluate(args, run, src, dst, cfg):
    from vqmoe_ds.finetune.lm_eval import held_out_loss, run_corpus
    from vqmoe_ds.training.data import eval_batches

    corpus = run_corpus(run, args.text_file)
    kw = dict(split=args.split, batch_size=args.eval_batch_size, max_batches=args.eval_iters)
    res = {"source": held_out_loss(src, corpus, **kw), "converted": held_out_loss(dst, corpus, **kw)}
    d_cfg = discrete_only_config(cfg, freeze_vq=True)
    disc, _, _ = load_lm(os.path.join(args.out_dir, "checkpoints"), TAG, cfg=d_cfg,
                         may_drop=absent_path_keys(cfg, d_cfg))
    res["discrete_only"] = held_out_loss(disc, corpus, **kw)
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


if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
