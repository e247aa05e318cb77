"""Save -> load resume at 2 ranks (ep_size=2, ZeRO 1): the resumed run continues the uninterrupted one."""
import json
import os
import subprocess
import sys

from test_launchers import records, run, tiny_args

from vqmoe_ds.training.launch import ROOT, env_for_ranks, free_port, torchrun_cmd


def test_resume_continues_the_same_run(tmp_path):
    full = tmp_path / "full"
    run(torchrun_cmd(2, tiny_args(full, "--save-interval", "10"), free_port()), tmp_path)
    ckpts = full / "checkpoints"
    assert (ckpts / "step10").is_dir() and (ckpts / "step20").is_dir()
    (ckpts / "latest").write_text("step10")  # resume from the middle of the run
    resumed = tmp_path / "resumed"
    run(torchrun_cmd(2, tiny_args(resumed, "--load", str(ckpts), "--save", str(tmp_path / "ck2")), free_port()),
        tmp_path)
    a = {r["step"]: r for r in records(full, "train")}
    b = {r["step"]: r for r in records(resumed, "train")}
    assert sorted(b) == list(range(11, 21))  # starts at step 11: step, data position restored
    for s in range(11, 21):
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])  # measured bit-exact (fp32, ZeRO 1)
        assert abs(a[s]["lr"] - b[s]["lr"]) < 1e-12  # scheduler restored
    va, vb = records(full, "valid")[-1], records(resumed, "valid")[-1]
    assert va["loss"] == vb["loss"]
    with open(os.path.join(resumed, "config.json")) as f:
        assert json.load(f)["run"]["load"] == str(ckpts)

    # tools/generate.py rebuilds the model at ep 1 from the ep-2 checkpoint and samples from it
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", str(ckpts), "--tag",
                        "step20", "--prompt", "7 + 5 = ", "--tokens", "40"], env=env_for_ranks(str(tmp_path)),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    sample = r.stdout.strip().splitlines()
    assert sample and "7 + 5 = " in r.stdout and len(r.stdout.split("7 + 5 = ", 1)[1]) >= 20
