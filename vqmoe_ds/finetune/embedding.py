"""Sentence embeddings from a pretrained checkpoint and their small evaluations.

Embedding: the mean (or last-token) pooled final hidden states of the language model with its LM head
replaced by an identity (the same pooling as the fine-tuning classifier).  Evaluations:

  * STS: Spearman correlation between the cosine similarity of the two sentences' embeddings and the gold
    score, from a TSV of ``s1<TAB>s2<TAB>score`` (an optional header line is skipped);
  * classification: a multinomial logistic regression (L2, full-batch L-BFGS) and a nearest-centroid rule
    (cosine) trained on the train file's embeddings, accuracy on the test file's;
  * clustering (MTEB's clustering task): k-means with k = the number of labels on the normalised embeddings of a
    labelled file, scored by the V-measure of the clusters against the labels (the harmonic mean of homogeneity
    and completeness, Rosenberg & Hirschberg 2007).

Why no scikit-learn / scipy: neither is in the pinned stack; these are a few lines of torch each and tested
against hand-computed values.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataError
from .data import collate
from .model import pool


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 16,
                pooling: str = "mean") -> torch.Tensor:
    """[N, D] pooled hidden states; ``model`` is a GPT / Transformer-XL whose ``lm_head`` is an identity."""
    if not isinstance(model.lm_head, nn.Identity):
        model.lm_head = nn.Identity()
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids = []
        for t in texts[i:i + batch_size]:
            e = np.asarray(tokenizer.encode(t), dtype=np.int64)[:max_len]
            if e.size == 0:
                raise DataError(f"text {i} is empty: every sentence needs at least one token")
            ids.append(e)
        idx, mask = collate(ids)
        device = next(model.parameters()).device  # the model may live on an accelerator (DS_ACCELERATOR=cuda)
        h, _, _, _ = model(idx.to(device))
        out.append(pool(h.float(), mask.to(device), pooling).cpu())
    return torch.cat(out)


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties given their average rank (as Spearman's rho needs)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, ranks)
    return (sums / counts)[inv]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def read_sts(path: str) -> Tuple[List[str], List[str], torch.Tensor]:
    from ..data.errors import require_text_file

    require_text_file(path, what="STS file", fix="give a TSV of s1<TAB>s2<TAB>score")
    s1, s2, gold = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(f"{path}:{n}: {len(parts)} fields, expected s1<TAB>s2<TAB>score: check the delimiter")
            try:
                score = float(parts[2])
            except ValueError:
                if n == 1 and not gold:
                    continue  # header
                raise DataError(f"{path}:{n}: score {parts[2]!r} is not a number: check the column order") from None
            s1.append(parts[0])
            s2.append(parts[1])
            gold.append(score)
    if len(gold) < 2:
        raise DataError(f"{path} has {len(gold)} scored pairs: Spearman needs at least 2")
    return s1, s2, torch.tensor(gold, dtype=torch.float64)


def sts_spearman(e1: torch.Tensor, e2: torch.Tensor, gold: torch.Tensor) -> float:
    return spearman(F.cosine_similarity(e1.double(), e2.double(), dim=-1), gold)


def nearest_centroid(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Predicted labels: the class whose mean (normalised) train embedding has the highest cosine similarity."""
    z = F.normalize(train_x.double(), dim=-1)
    cent = torch.zeros(num_labels, z.shape[1], dtype=torch.float64).index_add_(0, train_y, z)
    return (F.normalize(test_x.double(), dim=-1) @ F.normalize(cent, dim=-1).t()).argmax(-1)


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_labels: int,
                        l2: float = 1e-3, iters: int = 200) -> torch.Tensor:
    """Predicted labels of a multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    mu, sd = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-6)
    x, xt = (train_x.double() - mu) / sd, (test_x.double() - mu) / sd
    lin = nn.Linear(x.shape[1], num_labels, dtype=torch.float64)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), train_y) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(xt).argmax(-1)


def v_measure(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """V-measure of ``clusters`` against ``labels``: 2 h c / (h + c) with homogeneity h = 1 - H(C|K) / H(C) and
    completeness c = 1 - H(K|C) / H(K) (h = 1 when H(C) = 0, c = 1 when H(K) = 0)."""
    labels, clusters = labels.long().cpu(), clusters.long().cpu()
    _, c_idx = torch.unique(labels, return_inverse=True)
    _, k_idx = torch.unique(clusters, return_inverse=True)
    n = float(labels.numel())
    table = torch.zeros(int(c_idx.max()) + 1, int(k_idx.max()) + 1, dtype=torch.float64)
    table.index_put_((c_idx, k_idx), torch.ones(labels.numel(), dtype=torch.float64), accumulate=True)

    def entropy(counts):
        p = counts[counts > 0] / n
        return float(-(p * p.log()).sum())

    def conditional(t):  # H(rows | columns) from the contingency table
        col = t.sum(0, keepdim=True).expand_as(t)
        nz = t > 0
        return float(-(t[nz] / n * (t[nz] / col[nz]).log()).sum())

    h_c, h_k = entropy(table.sum(1)), entropy(table.sum(0))
    hom = 1.0 if h_c == 0 else 1.0 - conditional(table) / h_c
    com = 1.0 if h_k == 0 else 1.0 - conditional(table.t()) / h_k
    return 0.0 if hom + com == 0 else 2 * hom * com / (hom + com)


def cluster_v_measure(x: torch.Tensor, labels: torch.Tensor, num_labels: int, seed: int = 0) -> float:
    """k-means (k = ``num_labels``) on the normalised embeddings, scored by `v_measure` against ``labels``."""
    from ..quantizers.kmeans import kmeans

    z = F.normalize(x.double(), dim=-1)
    if z.shape[0] < num_labels:
        raise DataError(f"clustering {num_labels} labels needs at least {num_labels} texts, got {z.shape[0]}")
    centres = kmeans(z, num_labels, iters=100, seed=seed)
    return v_measure(labels, torch.cdist(z, centres).argmin(1))
