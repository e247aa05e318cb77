"""The run's scalars go through DeepSpeed's monitor, configured by the ds_config: TensorBoard in OUT_DIR/tensorboard
when the ds_config names no monitor, or what it names (here DeepSpeed's CSV monitor, and then no TensorBoard); the
events are the log records' scalars, read back from the files the monitors wrote."""
import csv
import json
import os

from vqmoe_ds.training.run_log import monitor_events

BASE = ["--corpus-bytes", "60000", "--train-iters", "3", "--log-interval", "1", "--eval-iters", "1", "--test-iters", "1",
        "--no-progress", "--no-plots", "--seq-length", "32", "--router", "topk"]


def _lm(*argv):
    from vqmoe_ds.training.lm import main

    return main([*BASE, *argv])


def _train_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_monitor_events_of_a_record():
    record = {"kind": "train", "step": 7, "time": 1.0, "loss": 2.5, "lr": 1e-3, "flag": True, "nan": float("nan"),
              "moe_summary": {"load_cv": 0.25},
              "moe": [{"vq_loss": 0.5, "expert_load": [3, 0, 1, 0], "code_counts": [0, 0]}]}
    assert monitor_events(record) == [("train/loss", 2.5, 7), ("train/lr", 1e-3, 7), ("moe/load_cv", 0.25, 7)]
    assert monitor_events(record, per_layer=True)[3:] == [("moe_layer0/vq_loss", 0.5, 7),
                                                          ("moe_layer0/expert_load_max_share", 0.75, 7),
                                                          ("moe_layer0/expert_load_used", 2.0, 7)]


def test_tensorboard_by_default_holds_the_logged_losses(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _lm("--out-dir", str(out)) == 0
    assert f"TensorBoard: {out / 'tensorboard'}" in capsys.readouterr().out
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}  # TensorBoard stores float32
    logged = {r["step"]: r["loss"] for r in _train_records(out)}
    assert sorted(losses) == sorted(logged) == [1, 2, 3]
    assert all(abs(losses[s] - logged[s]) <= 1e-6 * logged[s] for s in logged)
    assert "moe/load_max_over_mean" in acc.Tags()["scalars"] and "Train/Samples/lr" in acc.Tags()["scalars"]


def test_a_csv_monitor_of_the_ds_config_replaces_tensorboard(tmp_path):
    out, csv_dir = tmp_path / "run", tmp_path / "csv"
    ds = json.loads(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs",
                                      "cpu_fp32.json")).read())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(csv_dir), "job_name": "run"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert _lm("--out-dir", str(out), "--deepspeed_config", str(tmp_path / "ds.json")) == 0
    assert not (out / "tensorboard").exists()
    with open(csv_dir / "run" / "train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    written = {int(s): float(v) for s, v in rows[1:]}
    assert written == {r["step"]: r["loss"] for r in _train_records(out)}


def test_a_config_file_of_an_earlier_version_with_run_tensorboard_is_read(tmp_path):
    """Earlier versions wrote ``run.tensorboard`` into config.json; such a file is still read (the key has no effect:
    the ds_config's monitor decides), while a misspelt key of the same section is refused."""
    out = tmp_path / "run"
    (tmp_path / "old.json").write_text(json.dumps({"run": {"tensorboard": False, "log_interval": 1}}))
    assert _lm("--out-dir", str(out), "--config-file", str(tmp_path / "old.json")) == 0
    assert (out / "tensorboard").is_dir()
    (tmp_path / "bad.json").write_text(json.dumps({"run": {"tensorbord": False}}))
    assert _lm("--out-dir", str(tmp_path / "run2"), "--config-file", str(tmp_path / "bad.json")) == 2
    assert not (tmp_path / "run2").exists()
