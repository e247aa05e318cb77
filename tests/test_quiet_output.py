"""Quiet by default: the known harmless messages of DeepSpeed, torch and megatron-core are filtered at their
source (each matched exactly, anything else still shows), and progress is plain periodic lines, without carriage
returns, when the output is not a terminal."""
import logging
import os
import subprocess
import sys
import warnings

from vqmoe_ds import quiet
from vqmoe_ds.training.run_log import RunLog, plain_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stdout_filter_drops_only_the_known_lines(capsys):
    with quiet.stdout_without(quiet.SHM_BUILT, quiet.EP_GROUP_CREATED):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("our line")
        print("No existing process group found, creating a new group named: ep_size_2")
        print("another line")
    assert capsys.readouterr().out == "our line\nanother line\n"


def test_unstarted_schedule_warning_is_dropped_around_engine_start_only():
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from deepspeed.utils import logger

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        with warnings.catch_warnings():
            with quiet.engine_start():  # DeepSpeed's own constructor, the source of the message
                WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=2)
                logger.warning("a DeepSpeed warning of another kind")
            assert seen == ["a DeepSpeed warning of another kind"]
            WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=2)
            assert seen[1:] == [quiet.UNSTARTED_SCHEDULE]  # outside the block it shows again
    finally:
        logger.removeHandler(handler)


def test_gather_deprecation_filtered_after_engine_start():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet.engine_start():
            pass
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated."]


def test_megatron_import_is_silent():
    code = ("import warnings; warnings.simplefilter('default')\n"
            "from vqmoe_ds.data.token_stream import indexed_dataset\n"
            "print(indexed_dataset().IndexedDataset.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and r.stdout == "IndexedDataset\n"
    assert quiet.NO_TE_APEX not in r.stderr


def test_progress_is_plain_lines_without_a_terminal(tmp_path, capsys):
    log = RunLog(str(tmp_path), rank=0, total_steps=40, progress=True)
    assert log.bar is None  # pytest's captured output is not a terminal
    for _ in range(40):
        log.progress(1, loss=1.5, **{"tokens/s": "2100"})
    log.close()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 20  # every 5% of the steps: 2, 4, ..., 40
    assert lines[0].startswith("train: step 2/40 (5%), 0:00:00 elapsed, ETA ")
    assert lines[-1].startswith("train: step 40/40 (100%), ") and "ETA" not in lines[-1]
    assert lines[-1].endswith(", loss=1.5, tokens/s=2100")


def test_plain_progress_line_by_hand():
    assert plain_progress(100, 400, 50, 125.0, {"loss": "1.234"}) == \
        "train: step 100/400 (25%), 0:02:05 elapsed, ETA 0:12:30, loss=1.234"  # 2.5 s/step x 300 steps
