"""Bits per token and PPL against hand-computed values (per byte / character / word: tests/test_lm_metrics.py)."""
import math

import pytest
import torch

from vqmoe_ds.training.metrics import NLLMeter, bpc, ppl


def test_uniform_model_over_bytes_is_8_bits_per_token_and_ppl_256():
    meter = NLLMeter()
    meter.add(torch.zeros(2, 5, 256), torch.randint(0, 256, (2, 5)))
    s = meter.summary()
    assert s["tokens"] == 10
    assert s["bits_per_token"] == pytest.approx(8.0, abs=1e-6)
    assert "bpc" not in s  # characters unknown without the split's counts
    assert s["ppl"] == pytest.approx(256.0, rel=1e-6)


def test_hand_computed_two_token_example():
    # vocab 2; token 1: p = e^2/(e^2+1); token 2 (target 0 with logits [0, 0]): p = 1/2
    logits = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    targets = torch.tensor([[1, 0]])
    meter = NLLMeter()
    meter.add(logits, targets)
    nll = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)
    assert meter.nll == pytest.approx(nll, rel=1e-6)
    assert meter.summary()["bits_per_token"] == pytest.approx(nll / 2 / math.log(2), rel=1e-6)
    assert meter.summary()["ppl"] == pytest.approx(math.exp(nll / 2), rel=1e-6)


def test_formulas():
    assert bpc(math.log(2) * 30, 30) == pytest.approx(1.0)
    assert bpc(3.0, 4) == pytest.approx(0.75 / math.log(2))
    assert ppl(math.log(20.0) * 7, 7) == pytest.approx(20.0)
