"""ep_size=2 on 2 ranks vs ep_size=1 on the whole batch: outputs and all gradients must agree."""
import sys

from common import finish, init

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vqmoe_ds.moe import MoEConfig  # noqa: E402
from vqmoe_ds.parallel import setup_expert_parallel  # noqa: E402

CASES = {
    "top2": dict(router="topk", top_k=2, balance_loss_coef=0.0),
    "vq": dict(router="vq", vq_distance="cosine", codebook_dim=4, codebook_size=6),
    "vqmoe": dict(router="vqmoe", codebook_size=6, balance_loss_coef=0.0, vq_distance="l2"),
    "vqmoe_default": dict(router="vqmoe", codebook_size=6, balance_loss_coef=0.0),
    "hash": dict(router="hash", vocab_size=40, hash_seed=1),
    "cluster": dict(router="cluster"),
}


def main(case, dispatcher, out_path):
    rank, world = init()
    T, D = 16, 12
    g = torch.Generator().manual_seed(123)
    x_full = torch.randn(world * T, D, generator=g)
    R_full = torch.randn(world * T, D, generator=g)
    ids_full = torch.randint(0, 40, (world * T,), generator=g)  # token ids, for hash routing
    layers = {}
    for ep in (1, world):
        torch.manual_seed(7)
        cfg = MoEConfig(hidden_size=D, ffn_hidden_size=20, num_experts=4, ep_size=ep, drop_tokens=False,
                        dispatcher=dispatcher, **CASES[case])
        layers[ep] = cfg.build()
        if ep > 1:
            setup_expert_parallel(layers[ep])
        if case == "cluster":  # fixed centroids (as after its warm-up), the same on every rank and both layers
            router = layers[ep].router
            router.centroids_ED.copy_(torch.nn.functional.normalize(torch.randn(4, D, generator=torch.Generator()
                                                                                 .manual_seed(9)), dim=-1))
            router.state.fill_(1)
    ref, par = layers[1], layers[world]
    # full batch through ep=1 (every rank computes it), local half through ep=2
    x1 = x_full.clone().requires_grad_(True)
    y1, aux1 = ref(x1, None, ids_full)
    ((y1 * R_full).sum() + aux1).backward()
    sl = slice(rank * T, (rank + 1) * T)
    x2 = x_full[sl].clone().requires_grad_(True)
    y2, aux2 = par(x2, None, ids_full[sl])
    # aux losses are means over the local tokens: scaled by the local share, their sum over ranks is global
    ((y2 * R_full[sl]).sum() + aux2 * (T / (world * T))).backward()
    res = {"y": (y2 - y1[sl]).abs().max().item(), "grad_x": (x2.grad - x1.grad[sl]).abs().max().item()}
    E_local = 4 // world
    ref_params = dict(ref.named_parameters())
    for n2, p2 in par.named_parameters():
        p1 = ref_params[n2]
        if p2.grad is None:
            assert p1.grad is None, n2
            continue
        if ".deepspeed_experts." in n2:
            local = int(n2.split(".deepspeed_experts.")[1].split(".")[0])
            glob = rank * E_local + local
            p1 = ref_params[n2.replace(f".deepspeed_experts.{local}.", f".deepspeed_experts.{glob}.")]
            res["w:" + n2] = (p2 - p1).abs().max().item()
            res["g:" + n2] = (p2.grad - p1.grad).abs().max().item()
        else:
            g2 = p2.grad.clone()
            dist.all_reduce(g2)
            res["w:" + n2] = (p2 - p1).abs().max().item()
            res["g:" + n2] = (g2 - p1.grad).abs().max().item()
    worst = max(res.values())
    print(f"rank {rank} {case} {dispatcher} worst {worst:.3g} {res}")
    torch.save(res, f"{out_path}.{rank}")
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
