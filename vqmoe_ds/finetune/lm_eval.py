"""Held-out language-model loss of a checkpoint on its own run's data (bits per byte/char, perplexity), for the tools.

Why here: the training-free conversion and the embedding tool evaluate checkpoints outside the pretraining
driver; they rebuild the run's corpus from its config.json (``--data-path``, ``--data-file`` or the default
corpus with its size and seed) through the driver's own data layer, so the numbers are comparable with the
driver's validation and test lines.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..training.data import eval_batches, load_corpus
from ..training.metrics import NLLMeter
from ..checkpoint import PretrainedRun


def run_corpus(run: PretrainedRun, text_file: Optional[str] = None):
    a = run.data_config
    if text_file:
        return load_corpus(None, text_file)
    return load_corpus(a.get("data_path"), a.get("data_file"), a.get("corpus_bytes") or 2_000_000, a.get("seed") or 0,
                       run.model_config.vocab_size)


@torch.no_grad()
def held_out_loss(model, corpus, split: str = "valid", batch_size: int = 8, seq_len: Optional[int] = None,
                  max_batches: int = 0) -> dict:
    """The metrics of ``training.metrics.lm_metrics`` (``loss``, ``bits_per_byte``, ``bpc``, ``word_ppl``, ...) of
    ``model`` on ``split``: every token once (``max_batches`` 0), windows in stream order (TXL: with memory),
    the padding of the last batch masked out, as the driver evaluates."""
    cfg = model.cfg
    seq_len = seq_len or cfg.seq_len
    meter, mems = NLLMeter(), None
    model.eval()
    dev = next(model.parameters()).device
    for x, y, mask in eval_batches(corpus.streams[split], cfg.model, batch_size, seq_len, 0, 1, max_batches):
        x, y = x.to(dev), y.to(dev)
        mask = mask.to(dev) if mask is not None else None
        logits, _, _, mems = model(x, None, mems, mask)
        meter.add(logits, y, mask)
    return meter.summary(corpus.split_counts(split))
