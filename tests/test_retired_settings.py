"""Settings that earlier versions wrote into checkpoints' markers and run config files (``moe.dispatcher``) are read
and ignored: such a checkpoint passes the architecture check of the current model, its model config builds, and
such a config file starts a run with the same settings as one without the key."""
from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.models import ModelConfig
from vqmoe_ds.moe import MoEConfig
from vqmoe_ds.training.lm import command_line, make_task


def test_a_marker_with_a_retired_moe_key_fits_the_current_model():
    current = ModelConfig(moe=MoEConfig.from_settings({"router": "vqmoe", "num_experts": 4, "top_k": 2})).to_dict()
    saved = {**current, "moe": {**current["moe"], "dispatcher": "sorted"}}
    ckpt.check_architecture(saved, current, "checkpoint X")  # no error
    assert ModelConfig.from_dict(saved).moe.settings() == current["moe"]


def test_a_config_file_with_a_retired_key_reads_as_without_it(tmp_path):
    with_key, without = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with_key.write_text("moe: {router: topk, num_experts: 4, dispatcher: deepspeed}\n")
    without.write_text("moe: {router: topk, num_experts: 4}\n")
    cmd = command_line()
    a = make_task(cmd.parse(["--config-file", str(with_key), "--corpus-bytes", "20000"]))
    b = make_task(cmd.parse(["--config-file", str(without), "--corpus-bytes", "20000"]))
    assert a.parsed.given("moe") == b.parsed.given("moe") == {"router": "topk", "num_experts": 4}
