"""Language-model metrics from summed negative log-likelihoods.

  * BPC (char-level, enwik8/text8): mean NLL per character in nats / ln 2.  With the byte tokenizer on ASCII
    text a token is a character; for other text it is bits per *byte*.
  * PPL (word-level, WikiText-103/lm1b): exp(mean NLL per token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def bpc(nll_sum_nats: float, num_chars: int) -> float:
    return nll_sum_nats / num_chars / math.log(2)


def ppl(nll_sum_nats: float, num_tokens: int) -> float:
    return math.exp(nll_sum_nats / num_tokens)


@dataclass
class NLLMeter:
    """Sums token NLLs in float64; `all_reduce` makes the sums global across data-parallel ranks."""
    nll: float = 0.0
    count: int = 0

    def add(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> None:
        self.nll += F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="sum").item()
        self.count += targets_BT.numel()

    def all_reduce(self) -> "NLLMeter":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([self.nll, float(self.count)], dtype=torch.float64)
            dist.all_reduce(t)
            return NLLMeter(t[0].item(), int(round(t[1].item())))
        return NLLMeter(self.nll, self.count)

    @property
    def loss(self) -> float:
        return self.nll / self.count

    def summary(self) -> dict:
        return {"loss": self.loss, "bpc": bpc(self.nll, self.count), "ppl": ppl(self.nll, self.count),
                "tokens": self.count}
