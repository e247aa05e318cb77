"""Upcycling (pretrain_vqmoe.py --upcycle-from): every expert starts as its layer's dense FFN.  With uniform routers
and renormalised top-k weights the upcycled MoE model computes the dense model's logits at step 0; the driver
takes the flag; a source that does not fit is one line before any step."""
import os

import pytest
import torch

BASE = ["--corpus-bytes", "60000", "--train-iters", "1", "--eval-iters", "1", "--test-iters", "1", "--no-progress",
        "--no-plots", "--micro-batch-size", "2", "--seq-length", "32"]
BLOCKS = {"gpt": [], "olmoe-block": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
                                      "--qk-norm", "hidden", "--disable-bias-linear"]}


def _driver(*argv):
    from dist_helper import clear_deepspeed_groups
    from vqmoe_ds.training.lm import main

    try:
        return main([*BASE, *argv])
    finally:
        clear_deepspeed_groups()


@pytest.fixture(scope="module", params=list(BLOCKS))
def dense_run(request, tmp_path_factory):
    """A dense tiny GPT trained one step by the driver (its checkpoint step1)."""
    out = tmp_path_factory.mktemp("dense") / "run"
    assert _driver("--router", "dense", "--out-dir", str(out), *BLOCKS[request.param]) == 0
    return out, BLOCKS[request.param]


def _dense_model(run):
    from vqmoe_ds.models import build_model

    sd = torch.load(os.path.join(run.path, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    model = build_model(run.model_config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_upcycled_model_computes_the_dense_logits_with_uniform_routers(dense_run):
    from vqmoe_ds.checkpoint import read_run
    from vqmoe_ds.checkpoint.upcycle import check_upcycle, upcycle
    from vqmoe_ds.models import build_model, moe_layers
    from vqmoe_ds.moe import MoEConfig

    out, _ = dense_run
    run = read_run(str(out))
    dense = _dense_model(run)
    cfg = run.model_config.replace(moe=MoEConfig.from_settings({"router": "topk", "num_experts": 4, "top_k": 2,
                                                                "drop_tokens": False}))
    torch.manual_seed(5)
    moe = build_model(cfg)
    report = upcycle(moe, check_upcycle(cfg, str(out)))
    assert report["expert_tensors"] == sum(len(dict(e.named_parameters())) for m in moe_layers(moe) for e in m.experts)
    assert all(k.endswith(("router.wg.weight", "router.step")) for k in report["kept_init"]), report["kept_init"]
    with torch.no_grad():
        for layer in moe_layers(moe):
            layer.router.wg.weight.zero_()  # uniform routers: every top-2 pair gets weights 1/2, 1/2
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = dense(x)[0], moe.eval()(x)[0]
    assert (a - b).abs().max().item() < 1e-5
    with torch.no_grad():  # and the routers do matter once they are not uniform
        moe_layers(moe)[0].router.wg.weight.normal_(0, 1.0)
        moe_layers(moe)[0].experts[0].fc2.weight.mul_(3.0)
        assert (dense(x)[0] - moe(x)[0]).abs().max().item() > 1e-3


def test_driver_upcycles_and_refuses_a_source_that_does_not_fit(dense_run, tmp_path, capsys):
    out, blocks = dense_run
    moe = ["--router", "topk", "--num-experts", "4", "--top-k", "2", "--no-drop-tokens", *blocks]
    assert _driver("--upcycle-from", str(out), "--out-dir", str(tmp_path / "up"), *moe) == 0
    assert f"upcycled from {out}" in capsys.readouterr().out  # the start-up line names the source
    for argv, words in [(["--hidden-size", "32"], "was trained with d_model=64, this run has 32"),
                        (["--expert-ffn-hidden-size", "64"], "set --expert-ffn-hidden-size 128"),
                        (["--router", "dense"], "there are no experts to upcycle")]:
        capsys.readouterr()
        rc = _driver("--upcycle-from", str(out), "--out-dir", str(tmp_path / "bad"), *moe, *argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and words in errors[0], errors
        assert not os.path.exists(tmp_path / "bad" / "log.jsonl")
