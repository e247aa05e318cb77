#!/usr/bin/env python
"""Sentence embeddings from a checkpoint (mean-pooled final hidden states) and two small evaluations.

    python tools/embed.py --load runs/tiny --sts sts.tsv --train train.tsv --test test.tsv --out emb.json

``--sts``: TSV of s1<TAB>s2<TAB>score -> Spearman between cosine similarity and the gold scores.
``--train/--test``: labelled TSV/CSV with a header (``--text-column``, ``--label-column``) -> accuracy of a
logistic regression and of a nearest-centroid rule on the embeddings.  ``--cluster``: a labelled TSV/CSV ->
V-measure of k-means clusters (k = its number of labels) against the labels (MTEB's clustering score).  ``--discrete-only`` embeds with the
VQMoE layers' discrete path only (eq. 7).  ``--save-embeddings FILE.pt`` also writes the test embeddings.
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
    ap.add_argument("--load", required=True)
    ap.add_argument("--tag")
    ap.add_argument("--run-config")
    ap.add_argument("--tokenizer-meta")
    ap.add_argument("--sts", help="s1<TAB>s2<TAB>score")
    ap.add_argument("--train", help="labelled TSV/CSV (header) for the classifiers")
    ap.add_argument("--test", help="labelled TSV/CSV (header): the accuracy reported")
    ap.add_argument("--cluster", help="labelled TSV/CSV (header): V-measure of k-means clusters of its texts")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--pooling", choices=("mean", "last"), default="mean")
    ap.add_argument("--discrete-only", action="store_true", help="VQMoE layers run only their discrete path")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="JSON with the results")
    ap.add_argument("--save-embeddings")
    a = ap.parse_args(argv)
    if not a.sts and not (a.train and a.test) and not a.cluster:
        ap.error("nothing to evaluate: give --sts, both --train and --test, and/or --cluster")
    if bool(a.train) != bool(a.test):
        ap.error("--train and --test go together")
    for p in (a.sts, a.train, a.test, a.cluster):
        if p and not os.path.isfile(p):
            ap.error(f"{p} does not exist")
    return a


def read_labelled(path, args, label_names=None):
    from vqmoe_ds.data.classification import read_table

    return read_table(path, args.text_column, args.label_column, "," if path.endswith(".csv") else "\t", label_names)


def run(args):
    from vqmoe_ds.data.errors import require_output
    from vqmoe_ds.finetune.embedding import (cluster_v_measure, embed_texts, logistic_regression, nearest_centroid,
                                             read_sts, sts_spearman)

    if args.out:
        require_output(args.out, "--out", "file")  # before any work
    from vqmoe_ds.checkpoint import load_lm, read_run, tokenizer_for
    from vqmoe_ds.finetune.discrete import absent_path_keys, discrete_only_config

    info = read_run(args.load, args.tag, args.run_config)
    tok = tokenizer_for(info, args.tokenizer_meta)
    # read every input before building the model
    sts = read_sts(args.sts) if args.sts else None
    train = read_labelled(args.train, args) if args.train else None
    test = read_labelled(args.test, args, train.label_names) if args.test else None
    clusters = read_labelled(args.cluster, args) if args.cluster else None
    cfg, drop = None, ()
    if args.discrete_only:
        src = info.model_config.replace_moe(ep_size=1)
        cfg = discrete_only_config(src)
        drop = absent_path_keys(src, cfg)
    model, info, _ = load_lm(args.load, args.tag, cfg=cfg, run_config=args.run_config, may_drop=drop,
                             run=info)  # verified once, above
    L = args.max_length or model.cfg.seq_len
    emb = lambda texts: embed_texts(model, tok, texts, L, args.batch_size, args.pooling)  # noqa: E731
    out = {"checkpoint": info.path, "pooling": args.pooling, "discrete_only": args.discrete_only}
    if sts:
        s1, s2, gold = sts
        out["sts"] = {"spearman": sts_spearman(emb(s1), emb(s2), gold), "pairs": len(gold)}
        print(f"STS Spearman {out['sts']['spearman']:.4f} over {len(gold)} pairs", flush=True)
    if train:
        xtr, xte = emb([t for t, _ in train.examples]), emb([t for t, _ in test.examples])
        ytr = torch.tensor([y for _, y in train.examples])
        yte = torch.tensor([y for _, y in test.examples])
        C = len(train.label_names)
        out["classification"] = {
            "logistic_regression": float((logistic_regression(xtr, ytr, xte, C) == yte).double().mean()),
            "nearest_centroid": float((nearest_centroid(xtr, ytr, xte, C) == yte).double().mean()),
            "train": len(ytr), "test": len(yte), "labels": train.label_names}
        c = out["classification"]
        print(f"classification accuracy: logistic regression {c['logistic_regression']:.4f}, nearest centroid "
              f"{c['nearest_centroid']:.4f} ({len(yte)} test examples)", flush=True)
        if args.save_embeddings:
            torch.save({"embeddings": xte, "labels": yte}, args.save_embeddings)
    if clusters:
        y = torch.tensor([y for _, y in clusters.examples])
        k = len(clusters.label_names)
        out["clustering"] = {"v_measure": cluster_v_measure(emb([t for t, _ in clusters.examples]), y, k),
                             "texts": len(y), "labels": clusters.label_names}
        print(f"clustering V-measure {out['clustering']['v_measure']:.4f} ({len(y)} texts, {k} labels)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None):
    from vqmoe_ds.training.launch import run_tool

    from vqmoe_ds.moe.config import ConfigError

    return run_tool(run, parse(argv), (CheckpointError, ConfigError, DataError, FileNotFoundError))


def cli() -> None:
    """The console script ``vqmoe-embed`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
