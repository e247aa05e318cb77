"""VQMoE models export to Hugging Face as a trust_remote_code package and come back without running it; every export
carries a SHA-256 manifest that its readers check.

The references are this project's own models, rebuilt from the raw tensors of DeepSpeed's files (``_logits`` of
test_hf_olmoe.py, no exporter involved), and a greedy loop over tokens for ``generate()``."""
import json
import os
import shutil

import pytest
import torch

from test_hf_olmoe import HF_SHAPE, TOL, _logits, _tool, hf, imported  # noqa: F401  (module fixtures)

transformers = pytest.importorskip("transformers")


def _save(cfg, out, randomise):
    """A driver checkpoint of ``cfg`` (OUT/checkpoints/made) with random weights; ``randomise(model)`` sets the
    routing tensors so that every path of the layer carries weight."""
    import deepspeed

    from vqmoe_ds.checkpoint import minimal_ds_config, store
    from vqmoe_ds.models import build_model
    from vqmoe_ds.parallel import init_single_process

    init_single_process()
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():
        randomise(model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=minimal_ds_config())
    store.save(engine, str(out / "checkpoints"), "made", {"step": 0, "model_config": cfg.to_dict(), "world_size": 1},
               model=model, step=0)
    return out


def _vq_options(router_cfg, **moe):
    from vqmoe_ds.checkpoint.hf import spelled_out

    cfg = router_cfg.replace_moe(router="vqmoe", ep_size=1, **moe)
    return spelled_out(cfg)


def _strong_routing(model):
    """Gate biases near 0 (g_d about 1/2), a non-zero expert bias, codebook rows spread out."""
    for name, p in model.named_parameters():
        if name.endswith("mix.bias"):
            p.copy_(torch.tensor([0.3, -0.2]))
        elif "vq_router" in name or name.endswith("mix.weight"):
            p.copy_(torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("expert_bias_E"):
            b.copy_(torch.randn_like(b) * 0.2)


CASES = {
    # the training-free conversion of the imported OLMoE with its discrete path on (cosine codebook = W_e)
    "converted_share_0.3": None,
    # low-dim L2 codebook, the discrete expert reads x, sigmoid scores renormalised and scaled, an expert bias
    "lowdim_l2_token_sigmoid_bias": dict(codebook_size=6, codebook_dim=8, vq_distance="l2", discrete_input="token",
                                         score_function="sigmoid", norm_topk_prob=True, topk_scaling_factor=1.5,
                                         expert_bias=True, z_loss_coef=0.0),
    # the authors' top-1 + discrete route with the single route at weight 1 (OLMoE's norm_topk_prob at k = 1)
    "top1_weight_one": dict(top_k=1, top1_weight="one", z_loss_coef=0.0),
    # eq. 7: the code's expert only, cosine codes at the token's norm
    "discrete_only": dict(codebook_size=8, vq_distance="cosine", vqmoe_mode="discrete_only", z_loss_coef=0.0),
}


@pytest.fixture(scope="module")
def vq_checkpoints(hf, imported):  # noqa: F811
    from vqmoe_ds.checkpoint import read_run

    out = {}
    conv = hf["dir"] / "vq_share"
    assert _tool("convert_to_vqmoe").main(["--load", str(imported), "--out-dir", str(conv), "--distance", "cosine",
                                           "--discrete-share", "0.3"]) == 0
    out["converted_share_0.3"] = conv
    base = read_run(str(imported)).model_config
    for name, moe in CASES.items():
        if moe is not None:
            out[name] = _save(_vq_options(base, **moe), hf["dir"] / name, _strong_routing)
    return out


def _greedy(model_logits, prompt, n):
    """Greedy decoding by re-running the whole sequence for every new token."""
    ids = prompt.clone()
    for _ in range(n):
        nxt = model_logits(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("case", list(CASES))
def test_vqmoe_exports_as_remote_code_with_our_logits_and_generates(vq_checkpoints, hf, case):  # noqa: F811
    from transformers import AutoModelForCausalLM

    src = vq_checkpoints[case]
    out = src / "hf"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out)]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == ["VQMoEOlmoeForCausalLM"] and cfg["auto_map"]["AutoModelForCausalLM"]
    assert {"configuration_vqmoe.py", "modeling_vqmoe.py", "vqmoe_manifest.json"} <= set(os.listdir(out))
    with pytest.raises(ValueError, match="trust_remote_code"):  # the package is code: transformers asks first
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(model).__name__ == "VQMoEOlmoeForCausalLM"
    ours, run = _logits(src, hf["x"])
    with torch.no_grad():
        theirs = model(hf["x"]).logits
    assert (theirs - ours).abs().max().item() < TOL
    # the VQ path matters in every case: without it the logits move far beyond the tolerance
    if case != "discrete_only":
        off = src / "gate_off"
        shutil.copytree(out, off)
        with torch.no_grad():
            m2 = AutoModelForCausalLM.from_pretrained(str(off), trust_remote_code=True).eval()
            for layer in m2.model.layers:
                layer.mlp.mix.bias.copy_(torch.tensor([0.0, -1e4]))
            assert (m2(hf["x"]).logits - ours).abs().max().item() > 1e-3
    # generate(): KV cache, one token at a time, against a greedy loop over our own model
    sd_model = _our_model(src)
    prompt = hf["x"][:1, :6]
    with torch.no_grad():
        want = _greedy(lambda ids: sd_model(ids)[0], prompt, 6)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=HF_SHAPE["pad_token_id"])
    assert torch.equal(got, want), (got, want)


def _our_model(src):
    from vqmoe_ds.checkpoint import read_run
    from vqmoe_ds.models import build_model

    run = read_run(str(src))
    sd = dict(torch.load(os.path.join(run.path, "mp_rank_00_model_states.pt"), weights_only=False)["module"])
    for name in os.listdir(run.path):
        if name.startswith("layer_") and "_expert_" in name:
            sd.update(torch.load(os.path.join(run.path, name), weights_only=False))
    torch.manual_seed(0)
    model = build_model(run.model_config.replace_moe(ep_size=1))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_our_reader_imports_the_export_without_its_code(vq_checkpoints, hf, tmp_path):  # noqa: F811
    """tools/convert_hf.py reads a VQMoE export as data: with its Python files replaced by code that raises (and the
    manifest removed, so nothing vouches for them) it still imports, with the same logits bit for bit and the same
    MoE settings, training-only ones (z-loss, VQ loss weight) included."""
    from vqmoe_ds.checkpoint import read_run

    case = "lowdim_l2_token_sigmoid_bias"
    src = vq_checkpoints[case]
    out = tmp_path / "hf"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out)]) == 0
    for name in ("configuration_vqmoe.py", "modeling_vqmoe.py"):
        (out / name).write_text("raise RuntimeError('this file was executed')\n")
    os.remove(out / "vqmoe_manifest.json")
    back = tmp_path / "back"
    assert _tool("convert_hf").main(["--hf-dir", str(out), "--out-dir", str(back)]) == 0
    a, ra = _logits(src, hf["x"])
    b, rb = _logits(back, hf["x"])
    assert torch.equal(a, b)
    keep = {k: v for k, v in ra.model_config.moe.settings().items() if k not in ("drop_tokens", "ep_size")}
    assert {k: getattr(rb.model_config.moe, k) for k in keep} == keep
    assert read_run(str(back)).client_state["converted_from"]["architecture"] == "VQMoEOlmoeForCausalLM"


def _zero_64_bytes(path, offset=200):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(64))


@pytest.mark.parametrize("damaged", ["model.safetensors", "modeling_vqmoe.py", "config.json"])
def test_hf_export_manifest_catches_a_changed_file(vq_checkpoints, tmp_path, capsys, damaged):  # noqa: F811
    src = vq_checkpoints["discrete_only"]
    out = tmp_path / "hf"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out)]) == 0
    size = os.path.getsize(out / damaged)
    _zero_64_bytes(out / damaged, offset=min(200, size - 64))
    assert os.path.getsize(out / damaged) == size  # same size: only the checksum can tell
    capsys.readouterr()
    rc = _tool("convert_hf").main(["--hf-dir", str(out), "--out-dir", str(tmp_path / "back")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and damaged in lines[0] and "SHA-256" in lines[0], err[-2000:]
    assert not (tmp_path / "back" / "checkpoints").exists()


def test_safetensors_export_manifest_is_checked_by_its_readers(vq_checkpoints, tmp_path, capsys):  # noqa: F811
    from vqmoe_ds.checkpoint import CheckpointError, load_exported

    src = vq_checkpoints["discrete_only"]
    out = tmp_path / "m.safetensors"
    assert _tool("export_checkpoint").main(["--load", str(src), "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors", "m.sha256.json"]
    model, _ = load_exported(str(out))
    _zero_64_bytes(out)
    with pytest.raises(CheckpointError, match="m.safetensors does not match the SHA-256"):
        load_exported(str(out))
    capsys.readouterr()
    gen = _tool("generate")
    rc = gen.main(["--weights", str(out), "--tokenizer-meta", str(tmp_path / "none.json"), "--prompt", "the"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match the SHA-256" in err and "Traceback" not in err, err[-2000:]


def test_exports_refuse_a_nonempty_out_unless_overwrite(vq_checkpoints, tmp_path, capsys):  # noqa: F811
    src = vq_checkpoints["discrete_only"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out)]) == 2
    assert "is not empty: give a new folder, or --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out),
                                            "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    st = tmp_path / "m.safetensors"
    assert _tool("export_checkpoint").main(["--load", str(src), "--out", str(st)]) == 0
    assert _tool("export_checkpoint").main(["--load", str(src), "--out", str(st)]) == 2
    assert _tool("export_checkpoint").main(["--load", str(src), "--out", str(st), "--overwrite"]) == 0


@pytest.mark.parametrize("moe,words", [
    (dict(vq_kind="lfq", codebook_size=8, z_loss_coef=0.0), "moe.vq_kind='lfq'; the VQMoE export"),
    (dict(shared_expert_size=8, z_loss_coef=0.0), "moe.shared_expert_size=8"),
])
def test_hf_export_refuses_what_it_cannot_hold_in_one_line(imported, tmp_path, capsys, moe, words):  # noqa: F811
    from vqmoe_ds.checkpoint import read_run

    base = read_run(str(imported)).model_config
    src = _save(_vq_options(base, **moe), tmp_path / "src", lambda m: None)
    capsys.readouterr()
    rc = _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and words in lines[0] and "--format safetensors" in lines[0], err[-2000:]
    assert not (tmp_path / "hf").exists()
