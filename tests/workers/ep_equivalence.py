"""ep_size=2 on 2 ranks vs ep_size=1 on the whole batch: outputs and all gradients must agree.

``ep_equivalence.py OUT CASE:DISPATCHER ...`` runs every case in this one process group and saves
``OUT.<rank>``: {"CASE:DISPATCHER": {difference name: max abs difference} or {"error": traceback}, "host_reads": ...}.
``host_reads``: what one forward and backward of the VQMoE layer with grouped-GEMM experts at ep 2 (shipped
capacity) reads back to the host, by kind (tests/sync_spy.py)."""
import sys
import traceback

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
    # routing options (balance loss weight on, so its gradient is compared too)
    "zloss": dict(router="topk", z_loss_coef=0.01, balance_loss_coef=0.0),
    "sigmoid": dict(router="topk", score_function="sigmoid", topk_scaling_factor=2.5, balance_loss_coef=0.0),
    "shared_gate": dict(router="topk", shared_expert_size=8, shared_expert_mode="gate", balance_loss_coef=0.0),
    "residual": dict(router="topk", shared_expert_size=8, shared_expert_mode="residual", balance_loss_coef=0.0),
    "force": dict(router="topk", force_load_balancing=True, balance_loss_coef=0.0),
    "expert_bias": dict(router="topk", expert_bias=True, bias_update_rate=0.01, balance_loss_coef=0.0),
    "global_aux": dict(router="topk", load_balancing_type="global_aux_loss", balance_loss_coef=0.1),
    "seq_aux": dict(router="topk", load_balancing_type="seq_aux_loss", balance_loss_coef=0.1),
}
SEQ = 8  # tokens per sequence where a case needs sequences


def compare(case, experts):
    rank, world = dist.get_rank(), dist.get_world_size()
    T, D = 16, 12
    g = torch.Generator().manual_seed(123)
    x_full = torch.randn(world * T, D, generator=g)
    R_full = torch.randn(world * T, D, generator=g)
    ids_full = torch.randint(0, 40, (world * T,), generator=g)  # token ids, for hash routing
    layers = {}
    for ep in (1, world):
        torch.manual_seed(7)
        cfg = MoEConfig(hidden_size=D, ffn_hidden_size=20, num_experts=4, ep_size=ep, drop_tokens=False,
                        expert_impl=experts, **CASES[case])
        layers[ep] = cfg.build()
        if ep > 1:
            setup_expert_parallel(layers[ep])
        if case == "expert_bias":  # a bias that changes the choices, the same on every rank and both layers
            layers[ep].router.expert_bias_E.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]))
        if case == "cluster":  # fixed centroids (as after its warm-up), the same on every rank and both layers
            router = layers[ep].router
            router.centroids_ED.copy_(torch.nn.functional.normalize(torch.randn(4, D, generator=torch.Generator()
                                                                                 .manual_seed(9)), dim=-1))
            router.state.fill_(1)
    ref, par = layers[1], layers[world]
    # full batch through ep=1 (every rank computes it), local half through ep=2
    shape = (-1, SEQ, D) if case == "seq_aux" else (-1, D)
    x1 = x_full.clone().requires_grad_(True)
    y1, aux1 = ref(x1.view(shape), None, ids_full)
    y1 = y1.reshape(-1, D)
    ((y1 * R_full).sum() + aux1).backward()
    sl = slice(rank * T, (rank + 1) * T)
    x2 = x_full[sl].clone().requires_grad_(True)
    y2, aux2 = par(x2.view(shape), None, ids_full[sl])
    y2 = y2.reshape(-1, D)
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
            g1 = p1.grad if p1.grad is not None else torch.zeros_like(p1)  # an expert no token reached: ep=1 skips
            res["g:" + n2] = (p2.grad - g1).abs().max().item()  # it, ep=2 runs it on 0 rows (zero gradient)
        else:
            g2 = p2.grad.clone()
            dist.all_reduce(g2)
            res["w:" + n2] = (p2 - p1).abs().max().item()
            res["g:" + n2] = (g2 - p1.grad).abs().max().item()
    if case == "expert_bias":  # the update after the step: loads summed over the ranks that share the router
        from vqmoe_ds.routers import update_expert_biases

        update_expert_biases(ref)
        update_expert_biases(par)
        res["bias"] = (ref.router.expert_bias_E - par.router.expert_bias_E).abs().max().item()
        res["bias_stuck"] = float(  # 1 if some expert's bias did not take its step of 0.01
            (par.router.expert_bias_E - torch.tensor([0.3, -0.1, 0.0, -0.2])).abs().min() < 0.009)
        # loads whose per-rank signs differ from the global ones: rank 0 [10, 0, 0, 0], rank 1 [0, 0, 0, 10]; summed
        # [10, 0, 0, 10], mean 5: the update is 0.01 x [-1, +1, +1, -1] on every rank
        before = par.router.expert_bias_E.clone()
        par.router.load_E.copy_(torch.tensor([10.0, 0, 0, 0] if rank == 0 else [0, 0, 0, 10.0]))
        update_expert_biases(par)
        want = before + 0.01 * torch.tensor([-1.0, 1.0, 1.0, -1.0])
        res["bias_global_loads"] = (par.router.expert_bias_E - want).abs().max().item()
    return res


def host_reads():
    """Host reads of one forward and backward at ep 2 with grouped-GEMM experts, after a first step."""
    from sync_spy import Patcher, SyncSpy

    torch.manual_seed(7)
    layer = MoEConfig(hidden_size=12, ffn_hidden_size=20, num_experts=4, ep_size=dist.get_world_size(),
                      router="vqmoe", codebook_size=6, expert_impl="grouped").build().train()
    setup_expert_parallel(layer)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(dist.get_rank()), requires_grad=True)
    layer(x)
    patcher = Patcher()
    try:
        with SyncSpy().watch(patcher) as spy:
            y, aux = layer(x)
            (y.sum() + aux).backward()
    finally:
        patcher.undo()
    return {"hits": dict(spy.hits), "where": {w.split("vqmoe_ds/")[-1]: n for w, n in spy.where.items()}}


def main(out_path, *specs):
    rank, _ = init()
    results = {}
    for spec in specs:
        case, experts = spec.split(":")
        try:
            results[spec] = compare(case, experts)
        except Exception:  # noqa: BLE001 -- reported per case; the other cases still run
            results[spec] = {"error": traceback.format_exc()}
        print(f"rank {rank} {spec}: {results[spec]}", flush=True)
    results["host_reads"] = host_reads()
    torch.save(results, f"{out_path}.{rank}")
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
