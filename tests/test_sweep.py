"""tools/sweep.py and vqmoe_ds.experiments: the statistics (intervals, TOST) against numbers worked out by hand, the
presets and the grid, each run's YAML config file, every bad input as one line with exit status 2 before anything
runs; the bookkeeping (results read back, failures, skipping finished runs, resuming from a checkpoint, the report's
numbers) with a fake driver of known numbers (tests/workers/fake_driver.py), and one real driver run read back."""
import csv
import json
import math
import os

import pytest

from vqmoe_ds.analysis.sweep_stats import by_seed, paired_difference, summarize, t_interval, tost
from vqmoe_ds.experiments import PRESETS, DriverSettings, build_grid, check_grid, steps_to_target
from vqmoe_ds.experiments.grid import write_config
from vqmoe_ds.experiments.report import default_target
from vqmoe_ds.models import count_params, flops_per_token, routes_per_token
from vqmoe_ds.moe.config import ROUTERS
from vqmoe_ds.training.launch import remove_new_shm, shm_files
from vqmoe_ds.training.lm import command_line, model_config

from tool_loader import load_tool

sweep = load_tool("sweep")

# Student t quantiles t_{0.975, dof} from a printed table (dof 1, 2, 3)
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824}


# ---- statistics ------------------------------------------------------------------------------------------------
def test_summary_is_the_sample_mean_and_std():
    s = summarize([2, 4, 4, 4, 5, 5, 7, 9, float("nan"), None])  # NaN and None are not results
    assert (s.n, s.mean, s.min, s.max) == (8, 5.0, 2.0, 9.0)
    assert s.std == pytest.approx(math.sqrt(32 / 7))  # squared deviations sum to 32, n - 1 = 7
    one = summarize([1.5])
    assert one.n == 1 and one.mean == 1.5 and math.isnan(one.std)


def test_paired_difference_by_hand():
    # test BPC of a router (a) and of the baseline (b) at four seeds; seed 5 has no pair and is left out
    a = {1: 1.50, 2: 1.62, 3: 1.55, 4: 1.58, 5: 1.40}
    b = {1: 1.47, 2: 1.60, 3: 1.49, 4: 1.56}
    # differences 0.03, 0.02, 0.06, 0.02: mean 0.0325; deviations -0.0025, -0.0125, 0.0275, -0.0125,
    # squares sum 0.001075, s = sqrt(0.001075 / 3) = 0.018930; half width 3.1824 x 0.018930 / 2 = 0.030121
    d = paired_difference(a, b)
    assert d.seeds == (1, 2, 3, 4) and d.n == 4
    assert d.mean == pytest.approx(0.0325)
    assert d.std == pytest.approx(0.0189297, abs=1e-6)
    assert d.low == pytest.approx(0.0325 - 0.030121, abs=2e-5)
    assert d.high == pytest.approx(0.0325 + 0.030121, abs=2e-5)
    assert not d.contains_zero


def test_interval_containing_zero_and_too_few_pairs():
    # two pairs, differences +0.1 and -0.1: mean 0, s = 0.141421, half width 12.7062 x 0.141421 / sqrt(2) = 1.27062
    d = paired_difference({1: 1.1, 2: 0.9}, {1: 1.0, 2: 1.0})
    assert d.mean == pytest.approx(0.0, abs=1e-12)
    assert (d.low, d.high) == (pytest.approx(-1.27062, abs=1e-4), pytest.approx(1.27062, abs=1e-4))
    assert d.contains_zero
    iv = t_interval([3.0, 5.0, 7.0])  # mean 5, s 2, half width 4.3027 x 2 / sqrt(3) = 4.96833
    assert (iv.low, iv.high) == (pytest.approx(5 - 4.96833, abs=1e-3), pytest.approx(5 + 4.96833, abs=1e-3))
    flat = t_interval([2.0, 2.0, 2.0])  # no spread: the interval is the point
    assert (flat.low, flat.high) == (2.0, 2.0)
    single = paired_difference({1: 1.2}, {1: 1.0, 2: 1.1})
    assert single.n == 1 and single.mean == pytest.approx(0.2) and math.isnan(single.low)
    assert not single.contains_zero
    assert by_seed([{"seed": 1, "x": 1.0}, {"seed": 2, "x": float("nan")}], "x") == {1: 1.0}


def _t2_cdf(t):
    """Student t CDF with 2 degrees of freedom, closed form: 1/2 + t / (2 sqrt(2 + t^2))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_tost_by_hand():
    # three paired differences 0.003, -0.002, 0.001: mean 0.000667; deviations 0.002333, -0.002667, 0.000333,
    # squares sum 1.2667e-5, s = sqrt(1.2667e-5 / 2) = 0.0025166, s / sqrt(3) = 0.0014530
    e = tost([0.003, -0.002, 0.001], margin=0.01)
    se = 0.0025166 / math.sqrt(3)
    t_low, t_high = (0.000667 + 0.01) / se, (0.000667 - 0.01) / se  # 7.341, -6.424
    assert e.n == 3 and e.t_low == pytest.approx(t_low, rel=1e-3) and e.t_high == pytest.approx(t_high, rel=1e-3)
    assert e.p_low == pytest.approx(1 - _t2_cdf(t_low), rel=1e-3)  # H0 mean <= -margin, one-sided upper tail
    assert e.p_high == pytest.approx(_t2_cdf(t_high), rel=1e-3)  # H0 mean >= margin, lower tail
    assert e.p == pytest.approx(max(e.p_low, e.p_high)) and e.p < 0.05 and e.equivalent
    # the same differences against a margin of 0.002: t_high = (0.000667 - 0.002) / se = -0.918, p = 0.228
    narrow = tost([0.003, -0.002, 0.001], margin=0.002)
    assert narrow.p == pytest.approx(_t2_cdf((0.000667 - 0.002) / se), rel=2e-3) and not narrow.equivalent
    # a clear difference is never "equivalent"; fewer than two values give no test
    assert not tost([0.05, 0.06, 0.04], margin=0.01).equivalent
    assert math.isnan(tost([0.001], margin=0.01).p) and not tost([0.001], margin=0.01).equivalent
    with pytest.raises(ValueError):
        tost([0.0, 0.1], margin=0.0)


def test_steps_to_target_and_default_target():
    curve = [(100, 3.0), (200, 2.6), (300, 2.45), (400, 2.41)]
    assert steps_to_target(curve, 2.5) == 300 and steps_to_target(curve, 2.41) == 400
    assert steps_to_target(curve, 2.0) is None
    rows = [{"status": "done", "best_valid_bpc": 2.413}, {"status": "done", "best_valid_bpc": 2.398},
            {"status": "failed", "best_valid_bpc": float("nan")}]
    assert default_target(rows) == pytest.approx(2.42)  # the highest, rounded up to 0.01: every run reaches it


# ---- presets and the grid --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def settings():
    return DriverSettings()


def test_presets(settings):
    assert set(PRESETS) >= {"table1", "robustness", "discrete_only", "seeds", "balancing", "paper", "paper_diffs"}
    table1 = build_grid("table1", settings=settings)
    assert table1.routers == [r for r in ROUTERS if r != "vq"]
    assert {"dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe"} <= set(table1.routers)
    assert len(table1.runs) == len(table1.routers) * 3 and len({r.name for r in table1.runs}) == len(table1.runs)
    stable = next(r for r in table1.runs if r.router == "stablemoe")
    assert stable.settings["moe.stablemoe_stage1_steps"] == 150  # half of --train-iters 300
    only = build_grid("discrete_only", settings=settings)
    assert only.groups == ["K8", "K16", "K32"]
    for run in only.runs:
        assert ("moe.vqmoe_mode" in run.settings) == (run.router == "vqmoe")
        assert run.settings["moe.codebook_size"] == int(run.group[1:])
    seeds = build_grid("seeds", settings=settings)
    assert (seeds.routers, seeds.seeds) == (["topk", "vqmoe"], [1, 2, 3])
    balancing = build_grid("balancing", settings=settings)
    assert balancing.groups == ["aux", "bias", "zloss"]
    for r in balancing.runs:
        assert ("moe.expert_bias" in r.settings) == (r.group == "bias")
        assert ("moe.z_loss_coef" in r.settings) == (r.group == "zloss")
    for name in PRESETS:  # every run of every preset passes the driver's own checks
        grid = build_grid(name, settings=settings)
        check_grid(grid, "/nonexistent/out", "none", settings)
        assert all(r.settings["run.save_interval"] > 0 for r in grid.runs)
        assert all(r.settings["config"] == "tiny" for r in grid.runs)


def test_paper_preset_follows_the_authors_scripts(settings, tmp_path):
    grid = build_grid("paper", seeds=[1], settings=settings)
    cmd = command_line()
    by_arm = {}
    for run in grid.runs:
        cfg = model_config(cmd.parse(["--config-file", write_config(str(tmp_path), run)]))
        by_arm[run.arm] = cfg
        assert cfg.model == "txl" and cfg.mem_len == cfg.seq_len == 64 and cfg.n_layer == 4
        m = cfg.moe_config(0)
        assert (m.num_experts, m.activation, m.drop_tokens, m.balance_loss_coef) == (16, "relu", False, 0.01)
        assert run.settings["optim.lr"] == 3.5e-4 and run.settings["optim.clip_grad"] == 0.25
        assert run.settings["optim.min_lr"] == 0.0 and run.settings["optim.lr_warmup_iters"] == 0
    vq, k2, k1 = (by_arm[a].moe_config(0) for a in ("vqmoe-k1", "topk-k2", "topk-k1"))
    assert (vq.router, vq.top_k, vq.codebook_size, vq.vq_alpha, vq.vq_beta) == ("vqmoe", 1, 16, 0.08, 0.25)
    assert (k2.router, k2.top_k, k1.router, k1.top_k) == ("topk", 2, "topk", 1)
    # the same expert routes per token as top-2 SMoE: 1 continuous + 1 discrete
    assert routes_per_token(vq) == routes_per_token(k2) == 2 and routes_per_token(k1) == 1
    diffs = {r.arm: r.settings for r in build_grid("paper_diffs", seeds=[1], settings=settings).runs}
    assert diffs["vqmoe-k1-authors"]["moe.vq_distance"] == "l2"
    assert diffs["vqmoe-k1-authors"]["moe.discrete_input"] == "token"
    assert diffs["vqmoe-k1-authors"]["moe.balance_loss_coef"] == 0.0
    assert diffs["vqmoe-k1-authors"]["moe.top1_weight"] == diffs["vqmoe-k1-w1"]["moe.top1_weight"] == "one"
    assert diffs["topk-k2-nobal"]["moe.balance_loss_coef"] == 0.0 and diffs["topk-k2"]["moe.balance_loss_coef"] == 0.01
    assert diffs["topk-k2"] == next(r for r in grid.runs if r.arm == "topk-k2").settings
    assert {k: v for k, v in diffs["vqmoe-k1"].items()} == \
        {k: v for k, v in next(r for r in grid.runs if r.arm == "vqmoe-k1").settings.items()}


def test_robustness_sizes_halve_the_experts_hidden_size(settings, tmp_path):
    grid = build_grid("robustness", seeds=[1], settings=settings)
    assert grid.groups == ["1M", "2M", "4M", "8M", "16M"]
    cmd = command_line()
    for run in grid.runs:
        cfg = model_config(cmd.parse(["--config-file", write_config(str(tmp_path), run)]))
        total = count_params(cfg)["total"]
        if run.router == "topk":
            nominal = float(run.group[:-1]) * 1e6
            assert 0.75 * nominal <= total <= 1.25 * nominal, (run.name, total)
            smoe = cfg
        else:  # VQMoE right after SMoE of the same size: the same model, its experts' hidden size halved
            assert (cfg.d_model, cfg.n_layer, cfg.d_inner) == (smoe.d_model, smoe.n_layer, smoe.d_inner), run.name
            assert cfg.expert_ffn * 2 == smoe.d_inner, run.name
            # every expert MLP (4 per layer, fc1 D x F + F, fc2 F x D + D) at F/2 instead of F: by hand
            D, F, L = smoe.d_model, smoe.d_inner, smoe.n_layer
            saved = L * 4 * ((2 * D * F + F + D) - (2 * D * (F // 2) + F // 2 + D))
            assert count_params(smoe)["experts"] - count_params(cfg)["experts"] == saved, run.name


def test_every_preset_value_can_be_replaced(settings):
    grid = build_grid("table1", routers=["topk", "smoe_dropout"], seeds=[7],
                      sets=["train-iters=40", "--lr=1e-3", "plots=false", "optim.weight_decay=0.1"],
                      extra=["--topk", "1", "--no-drop-tokens", "--stablemoe-stage1-steps", "5"], settings=settings)
    assert [r.name for r in grid.runs] == ["topk_s7", "smoe_dropout_s7"]
    s = grid.runs[1].settings
    assert s["optim.train_iters"] == 40 and s["optim.lr"] == 1e-3 and s["optim.weight_decay"] == 0.1
    assert s["optim.lr_warmup_iters"] == 2 and s["moe.smoe_dropout_k_steps"] == 40
    assert s["moe.top_k"] == 1 and s["moe.drop_tokens"] is False and s["run.plots"] is False
    assert (s["moe.router"], s["optim.seed"]) == ("smoe_dropout", 7)
    varied = build_grid("discrete_only", seeds=[1], vary=["codebook-size=4,8"], settings=settings)
    assert [r.name for r in varied.runs] == ["topk_codebook-size4_s1", "vqmoe_codebook-size4_s1",
                                             "topk_codebook-size8_s1", "vqmoe_codebook-size8_s1"]
    assert varied.runs[1].overrides == {"codebook-size": "4", "vqmoe-mode": "discrete_only"}
    assert varied.runs[2].overrides == {"codebook-size": "8"}  # --num-experts is the tiny shape's again
    assert [r.name for r in build_grid("robustness", seeds=[2], only_groups=["2M"], settings=settings).runs] == \
        ["topk_2M_s2", "vqmoe_2M_s2"]


def test_a_run_config_file_is_what_the_driver_reads(settings, tmp_path):
    grid = build_grid("seeds", seeds=[3], sets=["train-iters=40", "plots=false"], settings=settings)
    run = grid.runs[1]
    path = write_config(str(tmp_path), run)
    assert path == str(tmp_path / "vqmoe_s3.yaml")
    parsed = command_line().parse(["--config-file", path])
    assert parsed.preset == "tiny"
    assert parsed.given("optim")["train_iters"] == 40 and parsed.given("optim")["seed"] == 3
    assert parsed.given("moe")["router"] == "vqmoe" and parsed.given("run")["plots"] is False
    assert parsed.given("run")["out_dir"] == str(tmp_path / "vqmoe_s3") and parsed.given("run")["progress"] is False


# ---- bad input -----------------------------------------------------------------------------------------------
BAD = {
    "unknown preset": (["--preset", "table9"], "unknown preset 'table9'"),
    "unknown router": (["--preset", "seeds", "--routers", "topk", "switch"], "unknown router 'switch'"),
    "unknown --set flag": (["--preset", "seeds", "--set", "num-layer=3"], "has no flag --num-layer (did you mean"),
    "--set without a value": (["--preset", "seeds", "--set", "num-layers"], "is not FLAG=VALUE"),
    "unknown extra flag": (["--preset", "seeds", "--", "--bogus", "1"], "unrecognized arguments: --bogus"),
    "bad value": (["--preset", "seeds", "--set", "num-layers=0"], "n_layer=0 must be >= 1"),
    "value of the wrong type": (["--preset", "seeds", "--", "--lr", "fast"], "--lr 'fast' is not a float"),
    "--set value of the wrong type": (["--preset", "seeds", "--set", "train-iters=many"], "is not an int"),
    "flag the sweep sets": (["--preset", "seeds", "--set", "seed=3"], "the sweep sets --seed itself"),
    "flag the sweep sets, after --": (["--preset", "seeds", "--", "--out-dir", "x"], "the sweep sets --out-dir"),
    "bad boolean": (["--preset", "seeds", "--set", "plots=maybe"], "--plots is a boolean"),
    "bad choice": (["--preset", "seeds", "--set", "vq-distance=manhattan"], "is not one of l2, cosine"),
    "ep size vs ranks": (["--preset", "seeds", "--set", "moe-expert-parallel-size=2"],
                         "does not divide the world size 1"),
    "missing data file": (["--preset", "seeds", "--", "--data-file", "/nonexistent/corpus.txt"],
                          "/nonexistent/corpus.txt does not exist"),
    "no launcher, two ranks": (["--preset", "seeds", "--launcher", "none", "--nproc", "2"], "--launcher none"),
    "unknown launcher": (["--preset", "seeds", "--launcher", "pbs"], "--launcher pbs"),
    "slurm parameters without slurm": (["--preset", "seeds", "--slurm", "timeout_min=5"], "--launcher slurm"),
    "bad margin": (["--preset", "seeds", "--margin", "0"], "--margin 0.0"),
    "baseline not swept": (["--preset", "seeds", "--baseline", "xmoe"], "--baseline xmoe"),
    "no save interval": (["--preset", "seeds", "--set", "save-interval=0"], "--save-interval 0"),
    "unknown override set": (["--preset", "robustness", "--groups", "3M"], "--groups 3M: no such override set"),
    "report of no sweep": (["--report-only"], "holds no sweep.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_runs_nothing(case, tmp_path, capsys):
    argv, expected = BAD[case]
    out = tmp_path / "sweep"
    assert sweep.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def test_a_folder_with_another_grid_is_refused(tmp_path, capsys, settings):
    out = tmp_path / "sweep"
    out.mkdir()
    stored = build_grid("seeds", seeds=[1, 2], settings=settings)
    (out / "sweep.json").write_text(json.dumps({"grid": stored.identity()}))  # no shared settings recorded
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "3", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a sweep of another grid" in err[0] and "topk_s3" in err[0], err
    assert "records no shared settings" in err[0], err
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "--out", str(out), "--dry-run"]) == 0
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "--set", "lr=0.01", "--out", str(out),
                       "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "optim.lr=0.003 where this one has optim.lr=0.01" in err[-1], err

    # a record with its shared settings: more seeds extend it; new runs with another shared setting do not
    (out / "sweep.json").write_text(json.dumps({"grid": stored.identity(), "common": stored.common}))
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "3", "--out", str(out), "--dry-run"]) == 0
    assert sweep.main(["--preset", "seeds", "--seeds", "3", "--out", str(out), "--dry-run"]) == 0
    assert sweep.main(["--preset", "seeds", "--seeds", "3", "--set", "lr=0.01", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "every run had --lr 0.003 where this one has --lr 0.01" in err[-1], err
    assert sweep.main(["--preset", "robustness", "--seeds", "1", "--out", str(out), "--dry-run"]) == 2
    assert "preset seeds, this one robustness" in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["grid"] == json.loads(json.dumps(stored.identity()))


def test_a_sweep_extends_a_folder_with_more_seeds_and_arms(tmp_path, capsys, monkeypatch):
    """Through the fake driver: topk x seed 1, then topk and vqmoe x seeds 1, 2 into the same folder: only the
    three new runs start, sweep.json records the union, and the report holds all four runs and their pair."""
    _fake_launcher(monkeypatch)
    out = tmp_path / "sweep"
    common = ["--out", str(out), "--launcher", "none", "--set", "train-iters=4", "eval-interval=2",
              "save-interval=2", "micro-batch-size=4"]
    assert sweep.main(["--preset", "seeds", "--routers", "topk", "--seeds", "1", *common]) == 0
    assert "1 runs, 0 finished before, 1 to run" in capsys.readouterr().out
    log = (out / "topk_s1.log").read_text()
    argv = ["--preset", "seeds", "--routers", "topk", "vqmoe", "--seeds", "1", "2", *common]
    assert sweep.main(argv) == 0
    assert "4 runs, 1 finished before, 3 to run" in capsys.readouterr().out
    assert (out / "topk_s1.log").read_text() == log and len(_argvs(out, "topk_s1")) == 1
    record = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in record["grid"]["runs"]] == ["topk_s1", "vqmoe_s1", "topk_s2", "vqmoe_s2"]
    assert [e["runs"] for e in record["extended"]] == [["vqmoe_s1", "topk_s2", "vqmoe_s2"]]
    assert record["command"][-len(common) - 3:-len(common)] == ["topk", "--seeds", "1"]
    assert sorted(_rows(out)) == ["topk_s1", "topk_s2", "vqmoe_s1", "vqmoe_s2"]
    # fake BASE 2.10 / 2.09 at seed 1, 2.14 / 2.11 at seed 2: vqmoe - topk = -0.01, -0.03
    md = (out / "sweep.md").read_text()
    assert [ln for ln in md.splitlines() if ln.startswith("| vqmoe | topk | 2 | -0.0200 [-0.1471, +0.1071]")], md
    # a narrower sweep (one arm, one seed) into the extended folder runs nothing and reports the folder
    assert sweep.main(["--preset", "seeds", "--routers", "vqmoe", "--seeds", "2", *common]) == 0
    assert "1 runs, 1 finished before, 0 to run" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text()) == record
    assert sorted(_rows(out)) == ["topk_s1", "topk_s2", "vqmoe_s1", "vqmoe_s2"]


# ---- the sweep's bookkeeping, with a fake driver -------------------------------------------------------------
FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "fake_driver.py")


def _fake_launcher(monkeypatch):
    """Every run starts tests/workers/fake_driver.py (known numbers, no training) instead of the driver."""
    import sys

    from vqmoe_ds.experiments import runner

    monkeypatch.setattr(runner, "launch_cmd", lambda launcher, nproc, args, port: ([sys.executable, FAKE, *args], {}))


def _rows(out):
    with open(out / "sweep.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def _argvs(out, name):
    path = out / name / "argv.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def test_sweep_bookkeeping_with_a_fake_driver(tmp_path, capsys, monkeypatch):
    """2 routers x 2 seeds through the fake driver.  First sweep: vqmoe_s2 fails after its step-2 checkpoint and
    topk_s2 before any; the table holds the fake's numbers for the others and the failures as such.  Second
    sweep: only those two run, vqmoe_s2 from its checkpoint (--load), topk_s2 from scratch; the report's means,
    standard deviations and paired intervals are the ones worked out by hand below.  Third: nothing runs."""
    _fake_launcher(monkeypatch)
    out = tmp_path / "sweep"
    argv = ["--preset", "seeds", "--routers", "topk", "vqmoe", "--seeds", "1", "2", "--out", str(out),
            "--launcher", "none", "--parallel", "2",
            "--set", "train-iters=4", "eval-interval=2", "save-interval=2", "micro-batch-size=4"]
    names = ["topk_s1", "vqmoe_s1", "topk_s2", "vqmoe_s2"]
    monkeypatch.setenv("FAKE_FAIL", "vqmoe_s2:3,topk_s2:1")
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert "2 of 4 runs failed" in err, err
    rows = _rows(out)
    assert sorted(rows) == sorted(names)
    cmd = command_line()
    base = {"topk_s1": 2.10, "vqmoe_s1": 2.09}  # the fake driver's BASE
    for name, bpc in base.items():
        r = rows[name]
        router = name.split("_")[0]
        assert r["status"] == "done" and r["steps"] == "4" and r["seed"] == "1"
        assert float(r["best_valid_bpc"]) == pytest.approx(bpc) and r["best_step"] == "4"
        assert float(r["best_valid_loss"]) == pytest.approx(bpc * math.log(2))
        assert float(r["test_bpc"]) == pytest.approx(bpc + 0.05)
        assert float(r["test_ppl"]) == pytest.approx(math.exp((bpc + 0.05) * math.log(2)))
        assert float(r["tokens_per_s"]) == 1025.0  # median of 1010, 1020, 1030, 1040
        assert (r["params_total"], r["params_active"]) == ("1000", "600")
        cfg = model_config(cmd.parse(["--config", "tiny", "--router", router]))
        assert float(r["flops_per_token"]) == pytest.approx(flops_per_token(cfg, batch_size=4))
        assert int(r["routes_per_token"]) == (3 if router == "vqmoe" else 2)  # top-2 (+ the discrete route)
        assert int(r["tokens_per_step"]) == 4 * 64  # micro-batch 4 x context 64, one rank
        assert float(r["train_flops"]) == pytest.approx(flops_per_token(cfg, batch_size=4) * 4 * 64 * 4)
    for name in ("topk_s2", "vqmoe_s2"):
        assert rows[name]["status"] == "failed" and rows[name]["best_valid_bpc"] == ""
        attempts = [json.loads(line) for line in open(out / name / "sweep_attempts.jsonl")]
        assert [a["exit_status"] for a in attempts] == [1]
    assert (out / "vqmoe_s2" / "checkpoints" / "latest").read_text() == "step2"
    assert not (out / "topk_s2" / "checkpoints").exists()

    # the second sweep runs only the failed two: vqmoe_s2 resumes from step 2, topk_s2 starts again
    monkeypatch.delenv("FAKE_FAIL")
    logs = {n: (out / f"{n}.log").read_text() for n in ("topk_s1", "vqmoe_s1")}
    assert sweep.main(argv) == 0, capsys.readouterr()
    assert "2 finished before, 2 to run" in capsys.readouterr().out
    assert [a[-2:] for a in _argvs(out, "vqmoe_s2")][1] == ["--load", str(out / "vqmoe_s2" / "checkpoints")]
    assert len(_argvs(out, "vqmoe_s2")) == 2 and _argvs(out, "topk_s2") == [["--config-file", str(out / "topk_s2.yaml")]]
    resumed = [ln for ln in (out / "vqmoe_s2.log").read_text().splitlines() if ln.startswith("# ") and " resume: " in ln]
    assert len(resumed) == 1 and f"--load {out / 'vqmoe_s2' / 'checkpoints'}" in resumed[0]
    assert f"--config-file {out / 'vqmoe_s2.yaml'}" in resumed[0]
    assert {n: (out / f"{n}.log").read_text() for n in logs} == logs  # the finished runs did not start again
    assert all(len(_argvs(out, n)) == 1 for n in ("topk_s1", "vqmoe_s1"))
    rows = _rows(out)
    assert all(r["status"] == "done" for r in rows.values())
    assert float(rows["vqmoe_s2"]["best_valid_bpc"]) == pytest.approx(2.11)
    assert float(rows["topk_s2"]["best_valid_bpc"]) == pytest.approx(2.14)
    attempts = [json.loads(line) for line in open(out / "vqmoe_s2" / "sweep_attempts.jsonl")]
    assert [a["exit_status"] for a in attempts] == [1, 0] and [a["resumed"] for a in attempts] == [False, True]
    assert float(rows["vqmoe_s2"]["wall_s"]) == pytest.approx(sum(a["seconds"] for a in attempts), abs=0.06)
    md = (out / "sweep.md").read_text()
    # best valid BPC: topk 2.10, 2.14 -> 2.1200 +- 0.0283; vqmoe 2.09, 2.11 -> 2.1000 +- 0.0141.  vqmoe - topk by
    # seed: -0.01, -0.03: mean -0.0200, s = 0.014142, half width 12.7062 x 0.014142 / sqrt(2) = 0.12706
    assert "| topk | 2 | 2.1200 ± 0.0283 | 2.1700 ± 0.0283 |" in md
    assert "| vqmoe | 2 | 2.1000 ± 0.0141 | 2.1500 ± 0.0141 |" in md
    vq = [ln for ln in md.splitlines() if ln.startswith("| vqmoe | topk | 2 | ")]
    assert len(vq) == 1 and vq[0].count("-0.0200 [-0.1471, +0.1071]") == 2 and "| 3/2 |" in vq[0], vq
    assert "## Steps and training FLOPs to a target validation BPC" in md
    for png in ("valid_curve.png", "test_bpc.png", "bpc_vs_flops.png"):
        assert (out / png).stat().st_size > 1000

    # a third sweep starts nothing: every run has results
    assert sweep.main(argv) == 0
    assert "4 finished before, 0 to run" in capsys.readouterr().out
    assert [len(_argvs(out, n)) for n in names] == [1, 1, 1, 2]

    # the reports again, from the folder alone, against another baseline and a stated target
    os.remove(out / "sweep.md")
    assert sweep.main(["--out", str(out), "--report-only", "--baseline", "vqmoe", "--target-bpc", "9.0"]) == 0
    md = (out / "sweep.md").read_text()
    assert [ln for ln in md.splitlines() if ln.startswith("| topk | vqmoe | 2 | +0.0200 [-0.1071, +0.1471]")]
    assert [ln for ln in md.splitlines() if ln.startswith("| 9.00 | topk | 2/2 | ")]


def test_one_real_run_is_read_back(tmp_path, capsys):
    """One real driver run (the shipped default VQMoE, 2 steps, no launcher): the table holds what the driver wrote
    (results.json, the compute of the model its flags give)."""
    out = tmp_path / "sweep"
    argv = ["--preset", "seeds", "--routers", "vqmoe", "--seeds", "1", "--out", str(out), "--launcher", "none",
            "--set", "train-iters=2", "eval-interval=2", "eval-iters=1", "save-interval=2", "micro-batch-size=4",
            "--", "--corpus-bytes", "50000", "--no-plots", "--test-iters", "1"]
    before = shm_files()
    try:
        assert sweep.main(argv) == 0, capsys.readouterr()
    finally:
        remove_new_shm(before)
    (r,) = _rows(out).values()
    assert r["run"] == "vqmoe_s1" and r["status"] == "done" and r["steps"] == "2"
    for key in ("best_valid_loss", "best_valid_bpc", "test_loss", "test_bpc", "test_ppl", "wall_s", "tokens_per_s"):
        assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
    res = json.load(open(out / "vqmoe_s1" / "results.json"))
    assert float(r["best_valid_bpc"]) == pytest.approx(res["best_valid"]["bpc"])
    assert float(r["best_valid_loss"]) == pytest.approx(res["best_valid"]["loss"])
    assert float(r["test_bpc"]) == pytest.approx(res["test"]["bpc"])
    assert float(r["test_ppl"]) == pytest.approx(math.exp(float(r["test_loss"])))
    info = json.load(open(out / "vqmoe_s1" / "run_info.json"))
    assert int(r["params_total"]) == info["params"]["total"] > int(r["params_active"]) == info["params"]["active"]
    cfg = model_config(command_line().parse(["--config", "tiny", "--router", "vqmoe"]))
    assert float(r["flops_per_token"]) == pytest.approx(flops_per_token(cfg, batch_size=4))
    assert int(r["routes_per_token"]) == 3 and int(r["tokens_per_step"]) == 4 * 64
    assert json.load(open(out / "vqmoe_s1" / "config.json"))["optim"]["train_iters"] == 2
