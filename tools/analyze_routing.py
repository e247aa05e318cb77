#!/usr/bin/env python
"""Routing analysis of a checkpoint (and of the checkpoints of one run) on some text.

    python tools/analyze_routing.py --load runs/tiny --tags step100,step200,step300 --out-dir runs/tiny/analysis

For the last checkpoint, per MoE layer and routing path (continuous router top-1 / discrete code's expert):
expert load (min / max / percentiles, ``load_summary``), code usage and dead codes, the consistency score
(Definition 4.1: share of tokens whose expert equals the expert of their nearest k-means centre of the layer's
inputs), and the representation-collapse view (PCA of each expert's inputs and outputs to 2-D, effective rank).
Across the checkpoints given: routing stability (share of the same tokens whose top-1 expert is unchanged
between consecutive checkpoints).  Writes OUT/summary.json and PNGs (matplotlib Agg).  Tokens: the run's
held-out split (``--split``) or ``--text-file``, in windows of the model's context, up to ``--max-tokens``.
"""
import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

import torch  # noqa: E402

from vqmoe_ds.data import DataError  # noqa: E402
from vqmoe_ds.checkpoint import CheckpointError  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", required=True, help="a run's --out-dir, its checkpoints folder or one tag folder")
    ap.add_argument("--tags", help="comma list of tags in training order (stability); default: the latest only")
    ap.add_argument("--run-config")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--text-file", help="analyse this text (tokenized with the run's tokenizer) instead of the run's data")
    ap.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clusters", type=int, help="k-means centres for the consistency score (default: num_experts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    if a.max_tokens < 1 or a.batch_size < 1 or (a.clusters is not None and a.clusters < 1):
        ap.error("--max-tokens, --batch-size and --clusters must be >= 1")
    return a


def token_batches(args, run, cfg):
    """[B, T] windows of the analysed text, the same for every checkpoint."""
    from vqmoe_ds.finetune.lm_eval import run_corpus
    from vqmoe_ds.checkpoint import tokenizer_for

    if args.text_file:
        from vqmoe_ds.data.errors import require_text_file

        require_text_file(args.text_file, utf8=False, what="--text-file", fix="give a text file")
        with open(args.text_file, encoding="utf-8", errors="replace") as f:
            ids = torch.tensor(tokenizer_for(run).encode(f.read()), dtype=torch.long)
    else:
        s = run_corpus(run).streams[args.split]
        ids = torch.as_tensor(s.read(0, min(len(s), args.max_tokens)), dtype=torch.long)
    T = min(cfg.seq_len, len(ids))
    n = min(len(ids), args.max_tokens) // T
    if n == 0:
        raise DataError(f"the analysed text has {len(ids)} tokens, fewer than one window: give more text")
    w = ids[:n * T].view(n, T)
    return [w[i:i + args.batch_size] for i in range(0, n, args.batch_size)]


def probe(model, batches):
    from vqmoe_ds.analysis import RoutingProbe

    with RoutingProbe(model) as p, torch.no_grad():
        for x in batches:
            model(x)
    return p


def analyse_layer(i, layer, rec, args, plots):
    from vqmoe_ds.analysis import consistency_score, expert_of, kmeans, load_summary, plot_collapse

    out = {"layer_index": i, "router": layer.cfg.router, "tokens": int(rec.x_TD.shape[0])}
    load = rec.expert_load()
    out["expert_load"] = load.tolist()
    out["load_summary"] = load_summary(load.numpy())
    codes = rec.code_counts()
    if codes is not None:
        out["code_counts"] = codes.tolist()
        out["dead_codes"] = int((codes == 0).sum())
        out["codes_used"] = int((codes > 0).sum())
    C = args.clusters or layer.cfg.num_experts
    centres = kmeans(rec.x_TD, C, seed=args.seed)
    out["consistency"] = {p: consistency_score(expert_of(layer, p), rec.x_TD, centres) for p in rec.paths()}
    if not args.no_plots:
        for which in ("in", "out"):
            rows = rec.expert_rows(which)
            if rows:
                path = os.path.join(args.out_dir, f"collapse_layer{i}_{which}puts.png")
                out[f"collapse_{which}puts"] = plot_collapse(
                    rows, f"layer {i} ({layer.cfg.router}): expert {which}puts, PCA", path)
                plots.append(path)
    return out


def plot_loads(layers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for ax, l in zip(axes[0], layers):
        ax.bar(range(len(l["expert_load"])), l["expert_load"], color="tab:blue", label="routes")
        ax.set_title(f"layer {l['layer_index']} load (max/mean {l['load_summary']['max_over_mean']:.2f})", fontsize=8)
        ax.set_xlabel("expert")
        if "code_counts" in l:
            ax2 = ax.twinx()
            ax2.plot(range(len(l["code_counts"])), l["code_counts"], "o", color="tab:orange", ms=3)
            ax2.set_ylabel(f"tokens per code ({l['dead_codes']} dead)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stability(stab, tags, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    pairs = [f"{a}->{b}" for a, b in zip(tags[:-1], tags[1:])]
    for key, vals in stab.items():
        ax.plot(range(len(vals)), vals, "o-", label=key)
    ax.set_xticks(range(len(pairs)), pairs, rotation=30, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("tokens with unchanged top-1 expert")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(args):
    from vqmoe_ds.analysis import stability_series
    from vqmoe_ds.data.errors import require_output

    require_output(args.out_dir, "--out-dir", "folder")  # before any work
    from vqmoe_ds.checkpoint import load_lm, read_run, resolve
    from vqmoe_ds.models import moe_layers

    save_dir, last = resolve(args.load)
    tags = [t.strip() for t in args.tags.split(",")] if args.tags else [last]
    for t in tags:
        resolve(save_dir, t)  # every tag checked before any model is built
    run = read_run(save_dir, tags[-1], args.run_config)
    if not run.model_config.is_moe:
        raise CheckpointError(f"{run.path} has no MoE layers: nothing to analyse")
    batches = token_batches(args, run, run.model_config)
    os.makedirs(args.out_dir, exist_ok=True)
    assign, summary, plots = [], {"checkpoints": [], "tags": tags}, []
    for k, tag in enumerate(tags):
        model, r, _ = load_lm(save_dir, tag, run_config=args.run_config,
                              run=run if k == len(tags) - 1 else None)  # the last tag was read (verified) above
        p = probe(model, batches)
        assign.append({(i, path): rec.top1(path) for i, rec in enumerate(p.records) for path in rec.paths()})
        summary["checkpoints"].append({"tag": tag, "step": r.client_state.get("step")})
        if k == len(tags) - 1:
            layers = moe_layers(model)
            summary["layers"] = [analyse_layer(i, layer, rec, args, plots)
                                 for i, (layer, rec) in enumerate(zip(layers, p.records))]
            summary["tokens"] = summary["layers"][0]["tokens"]
    if len(tags) > 1:
        keys = [k for k in assign[0] if all(k in a for a in assign)]
        stab = {f"layer{i} {path}": stability_series([a[(i, path)] for a in assign]) for i, path in keys}
        summary["stability"] = stab
        if not args.no_plots:
            plots.append(os.path.join(args.out_dir, "stability.png"))
            plot_stability(stab, tags, plots[-1])
    if not args.no_plots:
        plots.append(os.path.join(args.out_dir, "expert_load.png"))
        plot_loads(summary["layers"], plots[-1])
    summary["plots"] = plots
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for l in summary["layers"]:
        cons = ", ".join(f"{p} {v:.3f}" for p, v in l["consistency"].items())
        extra = f", codes used {l['codes_used']}/{len(l['code_counts'])}" if "code_counts" in l else ""
        print(f"layer {l['layer_index']}: load max/mean {l['load_summary']['max_over_mean']:.2f}, consistency {cons}"
              f"{extra}", flush=True)
    for key, vals in summary.get("stability", {}).items():
        print(f"stability {key}: {', '.join(f'{v:.3f}' for v in vals)}", flush=True)
    print(f"summary: {os.path.join(args.out_dir, 'summary.json')}", flush=True)
    return summary


def main(argv=None):
    from vqmoe_ds.training.launch import run_tool

    return run_tool(analyse, parse(argv), (CheckpointError, DataError, FileNotFoundError, ValueError))


def cli() -> None:
    """The console script ``vqmoe-analyze-routing`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
