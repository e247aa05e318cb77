"""Held-out language-model metrics of a checkpoint outside the pretraining driver (``tools/evaluate.py``, the
training-free conversion's ``--eval``): the same data layer and the same metrics (``training.metrics.lm_metrics``:
loss, bits per token / byte / character, token and word perplexity) as the driver's validation and test lines.

The data: a ``--data-path`` prefix (what ``tools/preprocess_data.py`` writes), a ``--text-file`` read as bytes, or
the run's own data from its config.json (``--data-path``, ``--data-file`` or the default corpus with its size and
seed).  Before anything is evaluated the data's tokenizer is checked against the one the checkpoint recorded: the
same kind and vocabulary, and for a Hugging Face tokenizer the same tokenizer.json (SHA-256), so that a model is
never scored on ids it was not trained on.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint import CheckpointError, PretrainedRun
from ..data import DataError
from ..training.data import eval_batches, load_corpus
from ..training.metrics import NLLMeter


def _describe(rec) -> str:
    return f"{rec.get('kind')} ({rec.get('vocab_size')} tokens)"


def check_same_tokenizer(recorded: Optional[dict], meta, where: str) -> None:
    """The data's tokenizer (``meta``: its TokenizerMeta, None for raw bytes) must be the checkpoint's
    (``recorded``: the record in its client state, None when it recorded none)."""
    from ..checkpoint.layout import file_digest

    if recorded is None:
        return
    data = {"kind": "byte", "vocab_size": 256} if meta is None else {"kind": meta.kind, "vocab_size": meta.vocab_size,
                                                                       "vocab_file": meta.vocab_file}
    if recorded.get("kind") != data["kind"] or int(recorded.get("vocab_size", 0)) != int(data["vocab_size"]):
        raise DataError(f"{where} is tokenized as {_describe(data)}, the model as {_describe(recorded)}: preprocess the "
                        f"text with the model's tokenizer (tools/preprocess_data.py --tokenizer "
                        f"{recorded.get('kind')}{' --hf-tokenizer ' + os.path.dirname(recorded['vocab_file']) if recorded.get('kind') == 'hf' and recorded.get('vocab_file') else ''})")
    mine, theirs = recorded.get("vocab_file"), data.get("vocab_file")
    if recorded.get("kind") == "hf" and mine and theirs and os.path.isfile(mine) and os.path.isfile(theirs) \
            and file_digest(mine) != file_digest(theirs):
        raise DataError(f"{where} was tokenized with {theirs}, which differs from the model's tokenizer {mine}: "
                        f"preprocess the text with the model's tokenizer (--hf-tokenizer {os.path.dirname(mine)})")


def eval_corpus(run: PretrainedRun, data_path: Optional[str] = None, text_file: Optional[str] = None):
    """The corpus to evaluate ``run``'s checkpoint on: ``data_path``, ``text_file`` (bytes), else the run's own data
    (an imported or converted model has none: then one of the two is required)."""
    recorded = run.client_state.get("tokenizer")
    vocab = run.model_config.vocab_size
    if data_path:
        corpus = load_corpus(data_path, None, model_vocab_size=vocab)
        check_same_tokenizer(recorded, corpus.meta, f"--data-path {data_path}")
        return corpus
    if text_file:
        if recorded is not None and recorded.get("kind") != "byte" or recorded is None and vocab != 256:
            raise DataError(f"--text-file is read as bytes, but the model's tokens are "
                            f"{_describe(recorded or {'kind': 'unknown', 'vocab_size': vocab})}: preprocess the text "
                            f"with tools/preprocess_data.py and give --data-path")
        return load_corpus(None, text_file)
    a = run.data_config
    origin = run.client_state.get("converted_from") or {}
    imported = origin.get("format") == "hf" or bool(origin.get("from_import"))
    bytes_model = (recorded or {}).get("kind", "byte") == "byte" and vocab == 256
    if not a.get("data_path") and not a.get("data_file") and (imported or not bytes_model):
        raise CheckpointError(f"{run.path} has no data of its own (an imported or converted model): give --data-path "
                              f"PREFIX, text preprocessed with the model's tokenizer (tools/preprocess_data.py)")
    corpus = load_corpus(a.get("data_path"), a.get("data_file"), a.get("corpus_bytes") or 2_000_000,
                         a.get("seed") or 0, vocab)
    check_same_tokenizer(recorded, corpus.meta, f"the run's data {corpus.source}")
    return corpus


def run_corpus(run: PretrainedRun, text_file: Optional[str] = None):
    """The run's own data (or ``text_file``): `eval_corpus` without a data path."""
    return eval_corpus(run, None, text_file)


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
