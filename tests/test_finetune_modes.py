"""finetune_vqmoe.py end to end on tiny checkpoints made by the pretraining driver.

* discrete mode at 2 ranks (torchrun, ep_size=2, ZeRO 1): accuracy on the 5-way source task rises far above
  chance; the codebook is bit-identical to the pretrained one and the continuous router / W_g are gone, while
  the rest of the model did train; measured expert FLOPs/token = 1 route per MoE layer;
* full mode (top-2 + discrete = 3 routes) and the top-2 SMoE baseline under the SMoE-Dropout protocol
  (2 routes, router bit-identical): the discrete path's measured cost is exactly 1/2 of the top-2 path's;
* a discrete run on a checkpoint without a codebook stops with one line before training.
"""
import json
import os

import torch

from test_finetune_support import CPU_CFG, ROOT, pretrained, reference_state, run_cmd, source_task, tmpdir
from vqmoe_ds.training.launch import free_port, torchrun_cmd

FINETUNE = os.path.join(ROOT, "finetune_vqmoe.py")
PER_ROUTE = 4 * 64 * 128  # tiny: d_model 64, expert width 128
MOE_LAYERS = 2


def finetune(nproc, load, mode, out, *extra, steps=30):
    task = source_task()
    args = ["--load", load, "--mode", mode, "--task", "csv", "--train", task["train"], "--test", task["test"],
            "--deepspeed_config", CPU_CFG, "--train-iters", str(steps), "--micro-batch-size", "16", "--lr", "2e-3",
            "--log-interval", "10", "--no-drop-tokens", "--out-dir", out, *extra]
    r = run_cmd(torchrun_cmd(nproc, args, free_port(), script=FINETUNE))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), r


def saved_module(save_dir):
    tag = open(os.path.join(save_dir, "latest")).read().strip()
    _, sd = reference_state(os.path.join(save_dir, tag))
    return sd


def test_discrete_mode_two_ranks_learns_and_leaves_routing_untouched():
    pre = pretrained("vqmoe")
    out, save = tmpdir("disc"), tmpdir("disc_ck")
    res, _ = finetune(2, pre, "discrete", out, "--moe-expert-parallel-size", "2", "--save", save)
    assert res["test"]["examples"] == 200
    assert res["test"]["accuracy"] > 0.5, res["test"]  # 5 balanced-ish labels: chance ~0.2
    _, before = reference_state(os.path.join(pre, "checkpoints", "step20"))
    after = saved_module(save)
    for i in range(MOE_LAYERS):
        key = f"blocks.{i}.ffn.vq_router.quantizer.codebook"
        assert torch.equal(after["backbone." + key], before[key])  # frozen: bit-identical
        assert not any(k.startswith(f"backbone.blocks.{i}.ffn.router.") or k.startswith(f"backbone.blocks.{i}.ffn.mix.")
                       for k in after)  # the continuous path does not exist in the fine-tuned model
        assert f"blocks.{i}.ffn.router.wg.weight" in before and f"blocks.{i}.ffn.mix.weight" in before
    assert not torch.equal(after["backbone.blocks.0.attn.c_attn.weight"], before["blocks.0.attn.c_attn.weight"])
    e = "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"  # an expert of rank 1 (ep=2)
    assert not torch.equal(after["backbone." + e], before[e])
    assert sorted(res["dropped_keys"]) == sorted(
        ["backbone.lm_head.weight"] + [f"backbone.blocks.{i}.ffn.{k}" for i in range(MOE_LAYERS)
                                       for k in ("router.step", "router.wg.weight", "mix.weight", "mix.bias")])
    flops = res["test"]["expert_flops"]
    assert [l["routes_per_token"] for l in flops["layers"]] == [1.0, 1.0]
    assert res["expert_flops_per_token"] == MOE_LAYERS * PER_ROUTE


def test_discrete_costs_half_of_top2_full_costs_three_routes():
    full, _ = finetune(1, pretrained("vqmoe"), "full", tmpdir("full"), steps=3)
    assert full["expert_flops_per_token"] == MOE_LAYERS * 3 * PER_ROUTE
    out, save = tmpdir("frozen"), tmpdir("frozen_ck")
    base, _ = finetune(1, pretrained("topk"), "frozen_router", out, "--save", save, steps=3)
    assert base["expert_flops_per_token"] == MOE_LAYERS * 2 * PER_ROUTE
    assert base["frozen_routing_parameters"] == MOE_LAYERS * 4 * 64  # W_e of each layer
    disc, _ = finetune(1, pretrained("vqmoe"), "discrete", tmpdir("disc1"), steps=3)
    assert disc["expert_flops_per_token"] / base["expert_flops_per_token"] == 0.5
    _, before = reference_state(os.path.join(pretrained("topk"), "checkpoints", "step20"))
    after = saved_module(save)
    for i in range(MOE_LAYERS):
        assert torch.equal(after[f"backbone.blocks.{i}.ffn.router.wg.weight"], before[f"blocks.{i}.ffn.router.wg.weight"])
    e = "blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.0.fc2.weight"
    assert not torch.equal(after["backbone." + e], before[e])  # experts trained


def test_discrete_mode_needs_a_codebook():
    task = source_task()
    args = ["--load", pretrained("topk"), "--mode", "discrete", "--task", "csv", "--train", task["train"],
            "--test", task["test"], "--deepspeed_config", CPU_CFG, "--out-dir", tmpdir("bad")]
    r = run_cmd(torchrun_cmd(1, args, free_port(), script=FINETUNE), expect="fail")
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "router vqmoe or vq" in err[0] and "--mode full" in err[0], r.stderr[-2000:]
    assert "step 1:" not in r.stdout


def test_two_rank_expert_parallel_load_is_exact():
    """ep_size=2: each rank loads its own experts' files (DeepSpeed's global -> local expert ids); after one step
    at lr 1e-9 every pretrained tensor (experts of both ranks included) is back within 1e-6 of the checkpoint."""
    pre, save = pretrained("vqmoe"), tmpdir("exact_ck")
    finetune(2, pre, "full", tmpdir("exact"), "--moe-expert-parallel-size", "2", "--save", save, "--lr", "1e-9",
             steps=1)
    _, before = reference_state(os.path.join(pre, "checkpoints", "step20"))
    after = saved_module(save)
    # usage_K is the codebook's EMA usage statistic: a training-mode forward moves it by design; the routers'
    # schedule step continues from the pretraining run's 20 steps (step 1 of fine-tuning is schedule step 20)
    keys = [k for k in before if k != "lm_head.weight" and not k.endswith(("usage_K", "router.step"))]
    assert int(before["blocks.0.ffn.router.step"]) == 19 and int(after["backbone.blocks.0.ffn.router.step"]) == 20
    assert any(".deepspeed_experts.3." in k for k in keys)
    for k in keys:
        assert (after["backbone." + k].float() - before[k].float()).abs().max() < 1e-6, k
