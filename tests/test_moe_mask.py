"""Padding takes no expert route: an MoE layer given a mask routes only the real tokens, so padding uses no
expert capacity, adds nothing to the auxiliary losses and statistics, and cannot evict another sequence's real
tokens.  Checked for every router with the expert loop and the grouped GEMM, and end to end through the fine-tuning classifier."""
import pytest
import torch

from layer_harness import make_layer

from vqmoe_ds.finetune.model import SequenceClassifier
from vqmoe_ds.models import build_model, named_config

ROUTERS = ["topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe", "vq"]


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("router", ROUTERS)
def test_masked_layer_equals_the_layer_on_the_real_tokens(router, experts):
    layer = make_layer(router=router, expert_impl=experts, drop_tokens=True, capacity_factor=0.75, min_capacity=1,
                       codebook_size=6)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(3, 8, 16, generator=g)
    mask_BT = torch.ones(3, 8, dtype=torch.bool)
    mask_BT[1, 3:] = False
    mask_BT[2, 6:] = False
    y, aux = layer(x_BTD, mask_BT)
    stats = layer.stats()
    layer.load_state_dict(state)
    y_real, aux_real = layer(x_BTD[mask_BT].unsqueeze(0))  # the real tokens alone, in the same order
    assert torch.equal(y[mask_BT], y_real[0])
    assert torch.equal(aux, aux_real)
    assert torch.equal(y[~mask_BT], torch.zeros_like(y[~mask_BT]))  # padding gets no expert output
    routes = {"vq": 1, "vqmoe": layer.cfg.top_k + 1}.get(router, layer.cfg.top_k)
    if router == "smoe_dropout":
        routes = layer.router.current_k()  # its k schedule starts at k_start
    assert int(stats["expert_load"].sum()) == int(mask_BT.sum()) * routes


def test_padding_cannot_evict_another_sequences_tokens():
    """Two batches that differ only in the padding of sequence 1 (its length and its pad ids) give sequence 0
    and the real tokens of sequence 1 exactly the same hidden states, with capacity tight enough to drop."""
    torch.manual_seed(0)
    cfg = named_config("tiny", moe={"router": "vqmoe", "eval_capacity_factor": 0.5, "min_capacity": 1})
    model = SequenceClassifier(build_model(cfg), num_labels=3).eval()
    g = torch.Generator().manual_seed(1)
    a = torch.randint(1, 256, (16,), generator=g)
    b = torch.randint(1, 256, (5,), generator=g)
    hidden = []
    for pad_id in (0, 97):
        idx = torch.stack([a, torch.cat([b, torch.full((11,), pad_id)])])
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0] = True
        mask[1, :5] = True
        with torch.no_grad():
            h, _, _, _ = model.backbone(idx, mask_BT=mask)
        hidden.append(h)
    assert torch.equal(hidden[0][0], hidden[1][0])
    assert torch.equal(hidden[0][1, :5], hidden[1][1, :5])
