"""Language-model metrics from summed negative log-likelihoods, in the units the literature reports.

A model predicts tokens, so its loss is per token; published numbers are per byte (enwik8), per character
(text8), or per word (WikiText-103, lm1b), whatever the tokenizer.  ``lm_metrics`` converts the summed NLL of
an evaluation with the counts of the split's text (``vqmoe_ds.data.text_counts``; recorded at preprocessing
time in ``PREFIX.tokenizer.json``, counted from the bytes for raw-byte data).  Keys (nats are natural log):

  * ``loss``: mean NLL per predicted token, nats;  ``tokens``: the tokens predicted;
  * ``bits_per_token`` = loss / ln 2;  ``token_ppl`` = ``ppl`` = exp(loss);
  * with the split's counts (N tokens, B bytes, C characters, W words, L lines of text):
    ``bits_per_byte`` = bits_per_token x N / B, ``bits_per_char`` = ``bpc`` = bits_per_token x N / C,
    ``word_ppl`` = exp(loss x N / W) (per whitespace-separated word, the normalisation of subword models'
    word-level perplexity), ``word_eol_ppl`` = exp(loss x N / (W + L)) (a line end counted as a word, as the
    word-level vocabularies of WikiText-103 and lm1b predict an end-of-line token: for ``--tokenizer word``
    it equals ``token_ppl``); ``split_tokens`` = N - 1, the tokens of the split a model predicts (the first has no
    context), and ``evaluated_fraction`` = tokens / split_tokens.

The conversions use the rate per token times the split's tokens per byte/character/word: over a whole split
(``evaluated_fraction`` 1) that is the total NLL divided by the split's bytes/characters/words, up to the first
token, which is never predicted -- so for byte-level data ``bits_per_byte`` equals ``bits_per_token`` exactly, as
in the enwik8 literature.  When fewer batches are evaluated (``--eval-iters``/``--test-iters``), the per-token
values are exact for the tokens evaluated and the per-byte/character/word ones assume those tokens carry the
split's average bytes/characters/words per token: estimates, flagged by ``evaluated_fraction`` < 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

LN2 = math.log(2)


def bpc(nll_sum_nats: float, num_chars: int) -> float:
    """Bits per character of ``num_chars`` characters whose summed NLL is ``nll_sum_nats``."""
    return nll_sum_nats / num_chars / LN2


def ppl(nll_sum_nats: float, num_tokens: int) -> float:
    return math.exp(nll_sum_nats / num_tokens)


def lm_metrics(nll_sum_nats: float, tokens: int, counts: Optional[Dict[str, int]] = None) -> Dict[str, float]:
    """The metrics of the module docstring from the summed NLL of ``tokens`` predicted tokens and the counts
    ``{"tokens", "bytes", "chars", "words", "lines"}`` of the evaluated split (None: per-token metrics only)."""
    loss = nll_sum_nats / tokens
    out: Dict[str, float] = {"loss": loss, "bits_per_token": loss / LN2, "token_ppl": math.exp(loss),
                             "ppl": math.exp(loss), "tokens": tokens}
    if counts:
        n = counts["tokens"]
        per = {"bytes": counts["bytes"], "chars": counts["chars"], "words": counts["words"],
               "words_and_lines": counts["words"] + counts["lines"]}
        rate = {k: (n / v if v else math.inf) for k, v in per.items()}  # tokens per unit of text
        out["bits_per_byte"] = loss / LN2 * rate["bytes"]
        out["bits_per_char"] = out["bpc"] = loss / LN2 * rate["chars"]
        out["word_ppl"] = _exp(loss * rate["words"])
        out["word_eol_ppl"] = _exp(loss * rate["words_and_lines"])
        out["split_tokens"] = n - 1
        out["evaluated_fraction"] = tokens / (n - 1) if n > 1 else 0.0
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class NLLMeter:
    """Sums token NLLs in float64; `all_reduce` makes the sums global across data-parallel ranks."""
    nll: float = 0.0
    count: int = 0

    def add(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: Optional[torch.Tensor] = None) -> None:
        """Add the NLL of the targets; ``mask_BT`` False marks padding, which adds nothing."""
        logits, targets = logits_BTV.float().flatten(0, 1), targets_BT.flatten()
        if mask_BT is not None:
            keep = mask_BT.flatten().to(torch.bool)
            logits, targets = logits[keep], targets[keep]
        if targets.numel():
            self.nll += F.cross_entropy(logits, targets, reduction="sum").item()
        self.count += targets.numel()

    def all_reduce(self) -> "NLLMeter":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from ..parallel import reduce_values

            nll, count = reduce_values([self.nll, float(self.count)])
            return NLLMeter(nll, int(round(count)))
        return NLLMeter(self.nll, self.count)

    @property
    def loss(self) -> float:
        return self.nll / self.count

    def summary(self, counts: Optional[Dict[str, int]] = None) -> dict:
        """``lm_metrics`` of the sums; ``counts``: the evaluated split's text counts."""
        return lm_metrics(self.nll, self.count, counts)
