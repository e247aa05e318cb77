"""Hugging Face OLMoE checkpoints, proven without a download: a tiny random OlmoeForCausalLM built and saved with the
installed transformers is imported (per-expert and fused 3-D expert layouts, one file and shards), its logits
compared with transformers' own forward at ep=1 here and at ep=2 on 2 gloo ranks, exported back and reloaded by
transformers with the same logits; then the training-free VQMoE conversion and the embedding evaluation run on
the imported model, and its bad inputs fail in one line before anything is written."""
import json
import os
import shutil

import pytest
from tool_loader import load_tool
import torch

from dist_helper import clear_deepspeed_groups, run_ranks

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32
WORDS = "the a cat dog sat ran on mat fast slow red blue big small one two".split()
HF_SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=1, eos_token_id=2,
                rope_theta=5000.0, initializer_range=0.2)  # weights large enough that logits reach ~5: a wrong rope
# base, norm epsilon (1e-6 for 1e-5) or top-k renormalisation moves them by 6e-4 to 3, far above TOL


class _tool:
    """A tool's ``main`` run in this process; DeepSpeed's cached groups of the process group it closed are dropped
    after it, so that the next tool (or test) starts clean."""

    def __init__(self, name):
        self.mod = load_tool(name)

    def main(self, argv):
        try:
            return self.mod.main(argv)
        finally:
            clear_deepspeed_groups()


def _write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))


def _fused_and_sharded(src, dst, n_layer):
    """The same model in newer transformers' fused layout (experts stacked into 3-D gate_up_proj / down_proj),
    split over two shards with an index: built here by renaming and stacking the per-expert tensors."""
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for i in range(n_layer):
        p = f"model.layers.{i}.mlp.experts."
        E = sum(1 for k in sd if k.startswith(p) and k.endswith("gate_proj.weight"))
        out[p + "gate_up_proj"] = torch.stack([torch.cat([sd[f"{p}{j}.gate_proj.weight"], sd[f"{p}{j}.up_proj.weight"]])
                                              for j in range(E)])
        out[p + "down_proj"] = torch.stack([sd[f"{p}{j}.down_proj.weight"] for j in range(E)])
    out.update({k: v for k, v in sd.items() if ".mlp.experts." not in k})
    os.makedirs(dst)
    keys = sorted(out)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: out[k].contiguous() for k in ks}, os.path.join(dst, name), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random OLMoE (norm weights randomised too, so every tensor's mapping matters; logits up to ~5), saved by transformers,
    with a word-level tokenizer; the same weights in the fused + sharded layout; transformers' logits."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**HF_SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(str(tmp / "per_expert"))
    _write_tokenizer(str(tmp / "per_expert"))
    _fused_and_sharded(str(tmp / "per_expert"), str(tmp / "fused"), HF_SHAPE["num_hidden_layers"])
    x = torch.randint(0, HF_SHAPE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
    torch.save({"x": x, "logits": ref}, tmp / "ref.pt")
    return {"dir": tmp, "x": x, "logits": ref}


@pytest.fixture(scope="module")
def imported(hf):
    """The per-expert folder imported by the tool (ep=1)."""
    out = hf["dir"] / "imported"
    assert _tool("convert_hf").main(["--hf-dir", str(hf["dir"] / "per_expert"), "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def converted(imported, hf):
    """tools/convert_to_vqmoe.py on the imported checkpoint (discrete path off)."""
    conv = hf["dir"] / "vq"
    assert _tool("convert_to_vqmoe").main(["--load", str(imported), "--out-dir", str(conv)]) == 0
    return conv


def _logits(out_dir, x):
    """Logits of the checkpoint's model, its tensors read straight from DeepSpeed's files (the dense file's module
    plus every layer_{l}_expert_{e} file; expert keys are global ids) -- no DeepSpeed engine, no process group."""
    from vqmoe_ds.checkpoint import read_run
    from vqmoe_ds.models import build_model

    run = read_run(str(out_dir))
    sd = dict(torch.load(os.path.join(run.path, "mp_rank_00_model_states.pt"), weights_only=False)["module"])
    for name in os.listdir(run.path):
        if name.startswith("layer_") and "_expert_" in name:
            sd.update(torch.load(os.path.join(run.path, name), weights_only=False))
    cfg = run.model_config.replace_moe(ep_size=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model.eval()(x)[0], run


def test_imported_logits_equal_transformers_in_both_expert_layouts(hf, imported):
    from vqmoe_ds.checkpoint import read_run

    ours, run = _logits(imported, hf["x"])
    assert (ours - hf["logits"]).abs().max().item() < TOL
    cfg = run.model_config
    assert (cfg.normalization, cfg.swiglu, cfg.position_embedding_type, cfg.qk_norm, cfg.rotary_base) == \
        ("RMSNorm", True, "rope", "hidden", 5000.0)
    assert run.client_state["converted_from"]["expert_layout"] == "per_expert"
    marker = json.load(open(imported / "checkpoints" / "imported" / "vqmoe_complete.json"))
    assert marker["imported"]["architecture"] == "OlmoeForCausalLM" and len(marker["sha256"]) == len(marker["files"])
    written = json.load(open(imported / "config.json"))  # the drivers' resolved format, read back by the driver
    assert set(written) == {"config", "model", "moe", "optim", "data", "run", "parallel", "imported"}
    assert written["config"] is None and written["imported"]["architecture"] == "OlmoeForCausalLM"  # not a preset
    from vqmoe_ds.training import lm

    again = lm.make_task(lm.command_line().parse(["--config-file", str(imported / "config.json")]))
    assert again.model_config == cfg
    fused = hf["dir"] / "imported_fused"
    assert _tool("convert_hf").main(["--hf-dir", str(hf["dir"] / "fused"), "--out-dir", str(fused), "--tokenizer",
                                     str(hf["dir"] / "per_expert" / "tokenizer.json")]) == 0
    assert read_run(str(fused)).client_state["converted_from"]["expert_layout"] == "fused"
    ours, _ = _logits(fused, hf["x"])
    assert (ours - hf["logits"]).abs().max().item() < TOL


def test_imported_logits_equal_transformers_at_ep2_on_two_ranks(hf):
    out = hf["dir"] / "imported_ep2"
    assert _tool("convert_hf").main(["--hf-dir", str(hf["dir"] / "per_expert"), "--out-dir", str(out), "--ep-size",
                                     "2"]) == 0
    marker = json.load(open(out / "checkpoints" / "imported" / "vqmoe_complete.json"))
    assert marker["world_size"] == 2 and marker["model_config"]["moe"]["ep_size"] == 2 and marker["imported"]
    res = hf["dir"] / "ep2_result"
    run_ranks("hf_logits.py", str(out / "checkpoints"), str(hf["dir"] / "ref.pt"), str(res), timeout=300)
    for rank in range(2):
        r = torch.load(f"{res}.{rank}")
        assert r["ep_size"] == 2 and r["max_diff"] < TOL, r


def test_export_reloads_in_transformers_with_equal_logits(hf, imported):
    from transformers import AutoModelForCausalLM

    out = hf["dir"] / "exported"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(imported / "checkpoints"), "--tag",
                                            "latest", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "OlmoeForCausalLM"
    with torch.no_grad():
        again = model(hf["x"]).logits
    assert (again - hf["logits"]).abs().max().item() < TOL
    cfg = json.load(open(out / "config.json"))
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["norm_topk_prob"]) == (2, 1, False)
    assert os.path.isfile(out / "tokenizer.json")  # the imported model's tokenizer goes along


def test_training_free_vqmoe_and_embeddings_on_the_imported_model(hf, imported, converted, tmp_path):
    """tools/convert_to_vqmoe.py on the imported checkpoint: codebook = each layer's router rows, discrete path off
    reproduces the imported logits; tools/embed.py evaluates it in MTEB's style (STS Spearman, logistic-regression
    accuracy, clustering V-measure) with the imported tokenizer."""
    from vqmoe_ds.checkpoint import read_run, tokenizer_for

    conv = converted
    ours, run = _logits(conv / "checkpoints", hf["x"])
    assert run.model_config.moe.router == "vqmoe"
    assert (ours - hf["logits"]).abs().max().item() < TOL
    sd = torch.load(conv / "checkpoints" / "converted" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from safetensors.torch import load_file

    src = load_file(hf["dir"] / "per_expert" / "model.safetensors")
    assert torch.equal(sd["blocks.1.ffn.vq_router.quantizer.codebook"], src["model.layers.1.mlp.gate.weight"])
    tok = tokenizer_for(read_run(str(imported)))
    assert tok.kind == "hf" and tok.decode(tok.encode("the cat sat")) == "the cat sat"
    sts = tmp_path / "sts.tsv"
    sts.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in [
        ("the cat sat", "the cat sat", 5), ("the dog ran", "a dog ran fast", 4), ("red mat", "blue mat", 3),
        ("one two", "big small", 1), ("the cat", "two slow", 0)]))
    rows = [("the cat sat on the mat", "cat"), ("a cat sat", "cat"), ("the red cat", "cat"), ("cat on mat", "cat"),
            ("the dog ran fast", "dog"), ("a dog ran", "dog"), ("the big dog", "dog"), ("dog ran slow", "dog")]
    table = tmp_path / "labelled.tsv"
    table.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    out = tmp_path / "emb.json"
    assert _tool("embed").main(["--load", str(conv), "--sts", str(sts), "--train", str(table), "--test", str(table),
                                "--cluster", str(table), "--out", str(out)]) == 0
    res = json.load(open(out))
    assert -1 <= res["sts"]["spearman"] <= 1 and res["sts"]["pairs"] == 5
    assert 0 <= res["classification"]["logistic_regression"] <= 1
    assert 0 <= res["clustering"]["v_measure"] <= 1 and res["clustering"]["texts"] == 8


def test_v_measure_against_hand_computed_values():
    from vqmoe_ds.finetune.embedding import v_measure

    t = torch.tensor
    assert v_measure(t([0, 0, 1, 1]), t([5, 5, 7, 7])) == pytest.approx(1.0)  # a relabelled perfect clustering
    assert v_measure(t([0, 0, 1, 1]), t([0, 0, 0, 0])) == pytest.approx(0.0)  # one cluster: no homogeneity
    # classes {0,0,1,1}, clusters {a,a,a,b}: H(C) = ln 2, H(C|K) = 3/4 H(2/3, 1/3), H(K) = H(3/4, 1/4), H(K|C) = 1/2 ln 2
    import math

    h = lambda *p: -sum(x * math.log(x) for x in p)  # noqa: E731
    hom = 1 - 0.75 * h(2 / 3, 1 / 3) / math.log(2)
    com = 1 - 0.5 * math.log(2) / h(0.75, 0.25)
    assert v_measure(t([0, 0, 1, 1]), t([0, 0, 0, 1])) == pytest.approx(2 * hom * com / (hom + com), abs=1e-12)


def _bad(tmp, hf_dir, **changes):
    """A copy of the per-expert folder with its config.json changed (None removes a key) or files removed."""
    d = tmp / "bad"
    shutil.copytree(hf_dir, d)
    if changes.pop("_no_config", False):
        os.remove(d / "config.json")
    cfg = json.load(open(d / "config.json")) if os.path.isfile(d / "config.json") else None
    for k, v in changes.items():
        cfg[k] = v
    if cfg is not None:
        json.dump(cfg, open(d / "config.json", "w"))
    return d


def _sharded_missing(tmp, hf_dir):
    d = tmp / "shards"
    shutil.copytree(hf_dir, d)
    os.remove(d / "model-00002-of-00002.safetensors")
    return d


BAD = [
    ("no config.json", lambda t, h: [str(_bad(t, h["dir"] / "per_expert", _no_config=True))], "has no config.json"),
    ("unsupported architecture", lambda t, h: [str(_bad(t, h["dir"] / "per_expert",
                                                        architectures=["MixtralForCausalLM"], model_type="mixtral"))],
     "architecture MixtralForCausalLM is not supported: supported are OlmoeForCausalLM (olmoe)"),
    ("missing shard", lambda t, h: [str(_sharded_missing(t, h["dir"] / "fused"))],
     "is missing shard model-00002-of-00002.safetensors"),
    ("shapes disagree", lambda t, h: [str(_bad(t, h["dir"] / "per_expert", intermediate_size=24))],
     "the shapes disagree with the config"),
    ("more experts than saved", lambda t, h: [str(_bad(t, h["dir"] / "per_expert", num_experts=8))],
     "tensor(s) missing"),
    ("ep does not divide", lambda t, h: [str(h["dir"] / "per_expert"), "--ep-size", "3"],
     "--ep-size 3 does not divide the 4 experts"),
    ("grouped-query attention", lambda t, h: [str(_bad(t, h["dir"] / "per_expert", num_key_value_heads=2))],
     "grouped-query attention"),
    ("rope scaling", lambda t, h: [str(_bad(t, h["dir"] / "per_expert",
                                            rope_scaling={"rope_type": "linear", "factor": 2.0}))],
     "rope type 'linear' is not supported"),
    ("rope scaled by a factor", lambda t, h: [str(_bad(t, h["dir"] / "per_expert",
                                                       rope_scaling={"factor": 4.0}))],
     "rope type 'scaled by factor 4.0' is not supported"),
]


@pytest.mark.parametrize("name,args,words", BAD, ids=[b[0] for b in BAD])
def test_bad_hf_input_is_one_line_before_anything_is_written(hf, tmp_path, capsys, name, args, words):
    a = args(tmp_path, hf)
    out = tmp_path / "out"
    rc = _tool("convert_hf").main(["--hf-dir", a[0], "--out-dir", str(out), *a[1:]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and words in lines[0], err[-2000:]
    assert not out.exists()
