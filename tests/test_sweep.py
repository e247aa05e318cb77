"""tools/sweep.py: the statistics against numbers worked out by hand, the presets and the grid, every bad input as
one line with exit status 2 before anything runs, and one real sweep (2 routers x 2 seeds of the tiny model, 4
steps, no launcher) that is rerun to check that finished runs are skipped and a run without results resumes
from its checkpoint."""
import csv
import importlib.util
import json
import math
import os
import sys

import pytest

from vqmoe_ds.analysis.sweep_stats import by_seed, paired_difference, summarize, t_interval
from vqmoe_ds.models import count_params
from vqmoe_ds.moe.config import ROUTERS
from vqmoe_ds.training.launch import DRIVER, remove_new_shm, shm_files
from vqmoe_ds.training.lm import command_line, model_config

ROOT = os.path.dirname(DRIVER)
_spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "tools", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep_tool"] = sweep  # its dataclasses look their module up there
_spec.loader.exec_module(sweep)

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
    single = paired_difference({1: 1.2}, {1: 1.0, 2: 1.1})
    assert single.n == 1 and single.mean == pytest.approx(0.2) and math.isnan(single.low)
    assert not single.contains_zero
    assert by_seed([{"seed": 1, "x": 1.0}, {"seed": 2, "x": float("nan")}], "x") == {1: 1.0}


# ---- presets and the grid --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flags():
    return sweep.DriverFlags()


def argv_value(argv, flag):
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_presets(flags):
    assert set(sweep.PRESETS) >= {"table1", "robustness", "discrete_only", "seeds", "balancing"}
    table1 = sweep.build_grid("table1", flags=flags)
    assert table1.routers == [r for r in ROUTERS if r != "vq"]
    assert {"dense", "topk", "xmoe", "stablemoe", "smoe_dropout", "vqmoe"} <= set(table1.routers)
    assert len(table1.runs) == len(table1.routers) * 3 and len({r.name for r in table1.runs}) == len(table1.runs)
    stable = next(r for r in table1.runs if r.router == "stablemoe")
    assert argv_value(stable.argv, "--stablemoe-stage1-steps") == "150"  # half of --train-iters 300
    only = sweep.build_grid("discrete_only", flags=flags)
    assert only.groups == ["K8", "K16", "K32"]
    for run in only.runs:
        assert ("--vqmoe-mode" in run.argv) == (run.router == "vqmoe")
        assert argv_value(run.argv, "--codebook-size") == run.group[1:]
    seeds = sweep.build_grid("seeds", flags=flags)
    assert (seeds.routers, seeds.seeds) == (["topk", "vqmoe"], [1, 2, 3])
    balancing = sweep.build_grid("balancing", flags=flags)
    assert balancing.groups == ["aux", "bias", "zloss"]
    for r in balancing.runs:
        assert ("--moe-router-enable-expert-bias" in r.argv) == (r.group == "bias")
        assert ("--moe-z-loss-coeff" in r.argv) == (r.group == "zloss")
    for name in sweep.PRESETS:  # every run of every preset passes the driver's own checks
        grid = sweep.build_grid(name, flags=flags)
        sweep.check_grid(grid, "/nonexistent/out", "none", flags)
        assert all(argv_value(r.argv, "--save-interval") != "0" for r in grid.runs)
        assert all(argv_value(r.argv, "--config") == "tiny" for r in grid.runs)


def test_robustness_sizes(flags):
    grid = sweep.build_grid("robustness", seeds=[1], flags=flags)
    assert grid.groups == ["1M", "2M", "4M", "8M", "16M"]
    cmd = command_line()
    for run in grid.runs:
        cfg = model_config(cmd.parse(run.argv))
        total = count_params(cfg)["total"]
        if run.router == "topk":
            nominal = float(run.group[:-1]) * 1e6
            assert 0.75 * nominal <= total <= 1.25 * nominal, (run.name, total)
            smoe = cfg
        else:  # VQMoE right after SMoE of the same size: the same model, its experts' hidden size halved
            assert (cfg.d_model, cfg.n_layer, cfg.d_inner) == (smoe.d_model, smoe.n_layer, smoe.d_inner), run.name
            assert cfg.expert_ffn * 2 == smoe.d_inner, run.name
            assert total < 0.7 * count_params(smoe)["total"]


def test_every_preset_value_can_be_replaced(flags):
    grid = sweep.build_grid("table1", routers=["topk", "smoe_dropout"], seeds=[7],
                            sets=["train-iters=40", "--lr=1e-3", "plots=false"],
                            extra=["--topk", "1", "--no-drop-tokens", "--stablemoe-stage1-steps", "5"], flags=flags)
    assert [r.name for r in grid.runs] == ["topk_s7", "smoe_dropout_s7"]
    argv = grid.runs[1].argv
    assert argv_value(argv, "--train-iters") == "40" and argv_value(argv, "--lr") == "1e-3"
    assert argv_value(argv, "--lr-warmup-iters") == "2" and argv_value(argv, "--smoe-dropout-k-steps") == "40"
    assert argv_value(argv, "--top-k") == "1" and "--no-drop-tokens" in argv and "--no-plots" in argv
    assert "--topk" not in argv  # aliases are written under the flag's own name
    varied = sweep.build_grid("discrete_only", seeds=[1], vary=["codebook-size=4,8"], flags=flags)
    assert [r.name for r in varied.runs] == ["topk_codebook-size4_s1", "vqmoe_codebook-size4_s1",
                                             "topk_codebook-size8_s1", "vqmoe_codebook-size8_s1"]
    assert varied.runs[1].overrides == {"codebook-size": "4", "vqmoe-mode": "discrete_only"}
    assert varied.runs[2].overrides == {"codebook-size": "8"}  # --num-experts is the tiny shape's again


# ---- bad input -----------------------------------------------------------------------------------------------
BAD = {
    "unknown preset": (["--preset", "table9"], "unknown preset 'table9'"),
    "unknown router": (["--preset", "seeds", "--routers", "topk", "switch"], "unknown router 'switch'"),
    "unknown --set flag": (["--preset", "seeds", "--set", "num-layer=3"], "has no flag --num-layer (did you mean"),
    "--set without a value": (["--preset", "seeds", "--set", "num-layers"], "is not FLAG=VALUE"),
    "unknown extra flag": (["--preset", "seeds", "--", "--bogus", "1"], "has no flag --bogus"),
    "bad value": (["--preset", "seeds", "--set", "num-layers=0"], "n_layer=0 must be >= 1"),
    "value of the wrong type": (["--preset", "seeds", "--", "--lr", "fast"], "--lr 'fast' is not a float"),
    "flag the sweep sets": (["--preset", "seeds", "--set", "seed=3"], "the sweep sets --seed itself"),
    "bad boolean": (["--preset", "seeds", "--set", "plots=maybe"], "--plots is a boolean"),
    "ep size vs ranks": (["--preset", "seeds", "--set", "moe-expert-parallel-size=2"],
                         "does not divide the world size 1"),
    "missing data file": (["--preset", "seeds", "--", "--data-file", "/nonexistent/corpus.txt"],
                          "--data-file /nonexistent/corpus.txt does not exist"),
    "no launcher, two ranks": (["--preset", "seeds", "--launcher", "none", "--nproc", "2"], "--launcher none"),
    "unknown launcher": (["--preset", "seeds", "--launcher", "slurm"], "--launcher slurm"),
    "baseline not swept": (["--preset", "seeds", "--baseline", "xmoe"], "--baseline xmoe"),
    "no save interval": (["--preset", "seeds", "--set", "save-interval=0"], "--save-interval 0"),
    "unknown override set": (["--preset", "robustness", "--groups", "3M"], "--groups 3M: no such override set"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_runs_nothing(case, tmp_path, capsys):
    argv, expected = BAD[case]
    out = tmp_path / "sweep"
    assert sweep.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def test_a_folder_with_another_grid_is_refused(tmp_path, capsys, flags):
    out = tmp_path / "sweep"
    out.mkdir()
    stored = sweep.build_grid("seeds", seeds=[1, 2], flags=flags)
    (out / "sweep.json").write_text(json.dumps({"grid": stored.identity()}))
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "3", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a sweep of another grid" in err[0] and "topk_s3" in err[0], err
    assert sweep.main(["--preset", "seeds", "--seeds", "1", "2", "--out", str(out), "--dry-run"]) == 0


# ---- one real sweep ----------------------------------------------------------------------------------------------
def test_sweep_runs_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--preset", "seeds", "--routers", "topk", "vqmoe", "--seeds", "1", "2", "--out", str(out),
            "--launcher", "none", "--parallel", "2",
            "--set", "train-iters=4", "eval-interval=2", "eval-iters=2", "save-interval=2", "micro-batch-size=4",
            "--", "--corpus-bytes", "50000", "--no-plots", "--no-tensorboard"]
    names = ["topk_s1", "vqmoe_s1", "topk_s2", "vqmoe_s2"]
    before = shm_files()
    try:
        assert sweep.main(argv) == 0, capsys.readouterr()
        with open(out / "sweep.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["run"] for r in rows) == sorted(names)
        for r in rows:
            assert r["status"] == "done" and r["steps"] == "4" and r["router"] in r["run"]
            assert r["seed"] == r["run"][-1]
            for key in ("best_valid_loss", "best_valid_bpc", "test_loss", "test_bpc", "test_ppl", "wall_s"):
                assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
            assert float(r["best_valid_bpc"]) == pytest.approx(float(r["best_valid_loss"]) / math.log(2))
            assert float(r["test_ppl"]) == pytest.approx(math.exp(float(r["test_loss"])))
            assert int(r["params_total"]) >= int(r["params_active"]) > 0
            res = json.load(open(out / r["run"] / "results.json"))
            assert float(r["test_bpc"]) == pytest.approx(res["test"]["bpc"])
        md = (out / "sweep.md").read_text()
        assert "| topk | 2 |" in md and "| vqmoe | 2 |" in md
        assert "Difference from topk (paired by seed, Student t interval)" in md
        vq = [ln for ln in md.splitlines() if ln.startswith("| vqmoe | 2 | ")]
        assert len(vq) == 2 and vq[1].count("[") == 2  # Δ valid and Δ test, each with its interval
        for png in ("valid_curve.png", "test_bpc.png"):
            assert (out / png).stat().st_size > 1000
        # a second sweep starts nothing: every run has results
        logs = {n: (out / f"{n}.log").read_text() for n in names}
        stamps = {n: (out / n / "log.jsonl").stat().st_mtime_ns for n in names}
        capsys.readouterr()
        assert sweep.main(argv) == 0
        assert "4 finished before, 0 to run" in capsys.readouterr().out
        assert {n: (out / f"{n}.log").read_text() for n in names} == logs
        assert {n: (out / n / "log.jsonl").stat().st_mtime_ns for n in names} == stamps
        # a run without results but with a checkpoint restarts from it
        os.remove(out / "vqmoe_s2" / "results.json")
        assert sweep.main(argv) == 0
        log = (out / "vqmoe_s2.log").read_text()
        resumed = [ln for ln in log.splitlines() if ln.startswith("# ") and " resume: " in ln]
        assert len(resumed) == 1 and f"--load {out / 'vqmoe_s2' / 'checkpoints'}" in resumed[0]
        assert (out / "vqmoe_s2" / "results.json").exists()
        assert {n: (out / f"{n}.log").read_text() for n in names if n != "vqmoe_s2"} == \
            {n: t for n, t in logs.items() if n != "vqmoe_s2"}
    finally:
        remove_new_shm(before)
