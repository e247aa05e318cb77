"""A VQMoE layer inside a DeepSpeed engine (ZeRO 1 or 2, ep_size=2): gate, mixing gate and codebook get
gradients and move after a step; the shared codebook stays identical on every rank.

``zero_step.py OUT STAGE:EMA ...`` runs each case (its own engine) in this one process group; rank 0 writes OUT
(JSON): {"STAGE:EMA": result or {"error": traceback}}."""
import json
import sys
import traceback

from common import finish, init

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from torch import nn  # noqa: E402

from vqmoe_ds.moe import MoEConfig  # noqa: E402


class Net(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.inp = nn.Linear(8, cfg.hidden_size)
        self.ffn = cfg.build()
        self.out = nn.Linear(cfg.hidden_size, 8)

    def forward(self, x):
        h = self.inp(x)
        y, aux = self.ffn(h)
        return self.out(h + y), aux


def case(stage, ema):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, ep_size=2, router="vqmoe", codebook_size=6,
                    codebook_dim=4, vq_distance="cosine", vq_ema=ema == "ema", vq_kmeans_init=ema == "ema",
                    vq_dead_code_threshold=0.3 if ema == "ema" else 0.0)
    model = Net(cfg)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "all"})
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": int(stage)}, "steps_per_print": 1000}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    q = engine.module.ffn.vq_router.quantizer
    watched = {"gate": engine.module.ffn.router.wg.weight, "mix": engine.module.ffn.mix.weight,
               "codebook": q.codebook}
    before = {k: v.detach().clone() for k, v in watched.items()}
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    res = {"grad_norm": {}, "changed": {}}
    for step in range(3):
        x = torch.randn(4, 10, 8, generator=g)
        y, aux = engine(x)
        loss = (y - x).square().mean() + aux
        engine.backward(loss)
        if step == 0:
            for k, p in watched.items():
                if p.requires_grad:
                    res["grad_norm"][k] = float(safe_get_full_grad(p).norm())
        engine.step()
    for k, v in watched.items():
        res["changed"][k] = float((v.detach() - before[k]).abs().max())
    cb = q.codebook.detach().clone()
    all_cb = [torch.empty_like(cb) for _ in range(world)]
    dist.all_gather(all_cb, cb)
    res["codebook_rank_diff"] = float(max((c - all_cb[0]).abs().max() for c in all_cb))
    res["usage_rank_diff"] = float(max((u - q.usage_K).abs().max() for u in _gather(q.usage_K, world)))
    res["restarted"] = bool(ema == "ema")
    return res


def main(out_path, *cases):
    rank, _ = init()
    results = {}
    for spec in cases:
        try:
            results[spec] = case(*spec.split(":"))
        except Exception:  # noqa: BLE001 -- reported per case; the other cases still run
            results[spec] = {"error": traceback.format_exc()}
        print(rank, spec, json.dumps(results[spec]), flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    finish()


def _gather(t, world):
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])
