"""The training-free VQMoE workflow (the paper's Table 8) on a real pretrained MoE, end to end, as a user runs it, at
expert parallelism 1 and 2: a tiny random OLMoE saved by transformers, with a tokenizer, is imported
(tools/convert_hf.py), converted (tools/convert_to_vqmoe.py: tokenizer, z-loss and router options carried),
evaluated (tools/evaluate.py on a --data-path preprocessed with the model's tokenizer, the driver's --eval-only
baseline, tools/embed.py), trained on (pretrain_vqmoe.py --config-file OUT/config.json --load OUT/checkpoints: a
fresh optimizer and lr schedule at step 0; finetune_vqmoe.py --mode discrete) and exported to Hugging Face
(trust_remote_code) -- each tool as its command line runs it.

References: transformers' own OlmoeForCausalLM logits, the raw tensors of the checkpoints (``_logits``), the
source model's scores for the converted one, and the driver's multi-rank evaluation for the one-process tool."""
import json
import os
import random

import pytest
import torch

from test_finetune_support import CPU_CFG, run_cmd
from test_hf_olmoe import TOL, WORDS, _logits, _tool, hf  # noqa: F401  (module fixture)
from vqmoe_ds.training.launch import ROOT, free_port, torchrun_cmd

pytest.importorskip("transformers")
FINETUNE = os.path.join(ROOT, "finetune_vqmoe.py")


@pytest.fixture(scope="module")
def data(hf):  # noqa: F811
    """Text in the tiny tokenizer's words, preprocessed with it; an STS file and a labelled table."""
    root = hf["dir"] / "text"
    root.mkdir()
    r = random.Random(0)
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (root / f"{split}.txt").write_text("".join(" ".join(r.choice(WORDS) for _ in range(r.randint(4, 12))) + "\n"
                                                   for _ in range(n)))
    prefix = hf["dir"] / "data" / "words"
    assert _tool("preprocess_data").mod.main(["--input", str(root), "--tokenizer", "hf", "--hf-tokenizer",
                                              str(hf["dir"] / "per_expert"), "--output-prefix", str(prefix)]) in (0, None)
    sts = hf["dir"] / "sts.tsv"
    sts.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in [
        ("the cat sat", "the cat sat", 5), ("the dog ran", "a dog ran fast", 4), ("red mat", "blue mat", 3),
        ("one two", "big small", 1), ("the cat", "two slow", 0), ("a big dog", "the big dog", 4)]))
    rows = [("the cat sat on the mat", "cat"), ("a cat sat", "cat"), ("the red cat", "cat"), ("cat on mat", "cat"),
            ("the dog ran fast", "dog"), ("a dog ran", "dog"), ("the big dog", "dog"), ("dog ran slow", "dog")]
    table = hf["dir"] / "labelled.tsv"
    table.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    return {"prefix": str(prefix), "sts": str(sts), "table": str(table)}


def _embed(load, data, out, *more):
    assert _tool("embed").main(["--load", str(load), "--sts", data["sts"], "--train", data["table"], "--test",
                                data["table"], "--cluster", data["table"], "--out", str(out), *more]) == 0
    res = json.load(open(out))
    return {k: res[k] for k in ("sts", "classification", "clustering")}


def _records(out_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["kind"] == kind]


@pytest.mark.parametrize("ep", [1, 2])
def test_imported_olmoe_to_vqmoe_evaluated_trained_and_exported(hf, data, tmp_path, capsys, ep):  # noqa: F811
    from transformers import AutoModelForCausalLM

    ranks = str(ep)
    # ---- import ----------------------------------------------------------------------------------------------
    imp = tmp_path / "olmoe"
    assert _tool("convert_hf").main(["--hf-dir", str(hf["dir"] / "per_expert"), "--out-dir", str(imp), "--ep-size",
                                     ranks]) == 0
    written = json.load(open(imp / "config.json"))
    assert written["config"] is None and written["imported"]["architecture"] == "OlmoeForCausalLM"
    ours, _ = _logits(imp, hf["x"])
    assert (ours - hf["logits"]).abs().max().item() < TOL

    # ---- convert: the tokenizer and every router option go along, checked before anything is written ---------
    vq = tmp_path / "olmoe_vq"
    assert _tool("convert_to_vqmoe").main(["--load", str(imp), "--out-dir", str(vq), "--ep-size", ranks, "--eval",
                                           "--data-path", data["prefix"], "--eval-iters", "0"]) == 0
    conv = json.load(open(vq / "conversion.json"))
    assert conv["eval"]["max_abs_logit_diff"] == 0.0
    assert conv["eval"]["converted"] == conv["eval"]["source"]  # discrete share 0: the source, every metric
    assert conv["conversion"]["router_options"]["z_loss_coef"] == 0.001
    converted, run = _logits(vq, hf["x"])
    assert torch.equal(converted, ours)  # exact
    assert run.model_config.moe.router == "vqmoe" and run.model_config.moe.z_loss_coef == 0.001
    assert run.client_state["tokenizer"]["vocab_file"] == str(vq / "tokenizer" / "tokenizer.json")
    cfg = json.load(open(vq / "config.json"))
    assert cfg["config"] is None and cfg["run"]["out_dir"] == str(vq) and cfg["converted"]["from_import"]
    assert cfg["moe"]["ep_size"] == ep
    capsys.readouterr()  # sampling decodes with the carried tokenizer (ids beyond it are never drawn)
    assert _tool("generate").main(["--load", str(vq), "--prompt", "the cat", "--tokens", "6"]) == 0
    sample = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert sample[:2] == ["the", "cat"] and set(sample) <= set(WORDS) | {"[UNK]", "[PAD]", "[EOS]"}, sample

    # ---- evaluate: perplexity on the data path, the same for source and converted; embeddings the same --------
    scores = {}
    for name, load in (("source", imp), ("converted", vq)):
        out = tmp_path / f"eval_{name}.json"
        assert _tool("evaluate").main(["--load", str(load), "--data-path", data["prefix"], "--out", str(out)]) == 0
        scores[name] = json.load(open(out))["splits"]
    assert scores["source"] == scores["converted"]
    assert set(scores["source"]) == {"valid", "test"} and scores["source"]["valid"]["evaluated_fraction"] == 1.0
    for key in ("loss", "bits_per_token", "token_ppl", "bits_per_byte", "bits_per_char", "word_ppl"):
        assert key in scores["source"]["test"]
    assert _embed(imp, data, tmp_path / "e_src.json") == _embed(vq, data, tmp_path / "e_vq.json")
    disc = _embed(vq, data, tmp_path / "e_disc.json", "--discrete-only")  # eq. 7: without the z-loss of the router
    assert -1 <= disc["sts"]["spearman"] <= 1

    # ---- the driver's step-0 baseline (--eval-only, on `ep` ranks) equals the one-process tool ----------------
    base = tmp_path / "baseline"
    run_cmd(torchrun_cmd(ep, ["--config-file", str(vq / "config.json"), "--load", str(vq / "checkpoints"),
                              "--data-path", data["prefix"], "--deepspeed_config", CPU_CFG, "--eval-iters", "0",
                              "--eval-only", "--out-dir", str(base), "--no-progress"], free_port()))
    b = json.load(open(base / "eval.json"))
    assert b["step"] == 0
    for split in ("valid", "test"):
        assert b[split]["tokens"] == scores["converted"][split]["tokens"]
        assert b[split]["loss"] == pytest.approx(scores["converted"][split]["loss"], rel=1e-6)

    # ---- continue training from the converted checkpoint: fresh optimizer and schedule at step 0 -------------
    ft = tmp_path / "continued"
    r = run_cmd(torchrun_cmd(ep, ["--config-file", str(vq / "config.json"), "--load", str(vq / "checkpoints"),
                                  "--data-path", data["prefix"], "--deepspeed_config", CPU_CFG, "--train-iters", "4",
                                  "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval",
                                  "2", "--micro-batch-size", "4", "--out-dir", str(ft), "--no-progress",
                                  "--no-plots"], free_port()))
    assert "was imported (vqmoe-conversion" in r.stdout and "resumed from" not in r.stdout
    train = _records(ft, "train")
    assert [t["step"] for t in train] == [1, 2, 3, 4]
    assert train[0]["lr"] < 3e-3  # in the warmup: the schedule starts at step 0
    assert all(t["loss"] == t["loss"] for t in train)
    assert [v["step"] for v in _records(ft, "valid")] == [2, 4]
    assert json.load(open(ft / "results.json"))["test"]["tokens"] == scores["converted"]["test"]["tokens"]
    trained, trun = _logits(ft / "checkpoints", hf["x"])
    assert trun.model_config.moe.ep_size == ep and not torch.equal(trained, converted)

    # ---- fine-tune a classifier on the discrete path (eq. 7, the imported z-loss has no router there) ---------
    cls = tmp_path / "classifier"
    run_cmd(torchrun_cmd(ep, ["--load", str(vq), "--mode", "discrete", "--task", "tsv", "--train", data["table"],
                              "--test", data["table"], "--deepspeed_config", CPU_CFG, "--train-iters", "2",
                              "--micro-batch-size", "4", "--moe-expert-parallel-size", ranks, "--out-dir", str(cls),
                              "--no-progress", "--no-plots"], free_port(), script=FINETUNE))
    assert 0.0 <= json.load(open(cls / "results.json"))["test"]["accuracy"] <= 1.0

    # ---- export the trained VQMoE to Hugging Face: transformers computes our logits and generates ------------
    exported = tmp_path / "hf_vq"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(ft / "checkpoints"), "--out",
                                            str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True).eval()
    with torch.no_grad():
        assert (model(hf["x"]).logits - trained).abs().max().item() < TOL
        assert model.generate(hf["x"][:1, :4], max_new_tokens=3, do_sample=False,
                              pad_token_id=1).shape == (1, 7)
    assert os.path.isfile(exported / "tokenizer.json")
