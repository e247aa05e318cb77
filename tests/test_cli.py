"""The command line generated from the config dataclasses (vqmoe_ds/cli.py), in-process:

  * every field of MoEConfig and of the model configs has a flag with a help line, in every driver that builds
    such a model;
  * flag -> config -> resolved config file -> config round-trips, for a non-default value of every field;
  * Megatron-DeepSpeed's spellings are aliases of the same settings; an alias and its flag given with
    different values is one line;
  * a config file (YAML or JSON) sets what flags do, flags override it, and an unknown key, a wrong type or a
    value out of range is one line naming the file, the key, the value and the fix.
"""
import dataclasses
import json

import pytest

from vqmoe_ds.cli import ConfigError
from vqmoe_ds.training.launch import ROOT
from vqmoe_ds.finetune import task as finetune
from vqmoe_ds.models import ModelConfig
from vqmoe_ds.moe.config import MoEConfig
from vqmoe_ds.training import lm
from vqmoe_ds.vision import task as vision
from vqmoe_ds.vision.vit import ViTConfig

# set by the model config, not by an MoE flag: (MoEConfig field, the model flag that sets it)
MOE_FROM_MODEL = {"hidden_size": "--hidden-size", "ffn_hidden_size": "--expert-ffn-hidden-size",
                  "init_std": "--init-method-std", "output_init_std": "--init-method-std", "vocab_size": "--vocab-size",
                  "linear_bias": "--add-bias-linear"}
NOT_FLAGS = {ModelConfig: {"moe"}, ViTConfig: {"moe", "in_chans", "num_classes"}}  # sections / set by the data


def fields_by_flag(cmd):
    return {(spec.section, spec.name): spec for spec in cmd.all_flags().values()}


@pytest.mark.parametrize("cmd,model_cls", [(lm.command_line(), ModelConfig), (vision.command_line(), ViTConfig)],
                         ids=["pretrain", "vision"])
def test_every_model_and_moe_field_has_a_flag_with_help(cmd, model_cls):
    have = fields_by_flag(cmd)
    flags = cmd.all_flags()
    for f in dataclasses.fields(MoEConfig):
        if f.name in ("vocab_size", "linear_bias") and model_cls is ViTConfig:
            continue  # images have no token vocabulary; the ViT keeps its biases
        if f.name in MOE_FROM_MODEL:
            assert MOE_FROM_MODEL[f.name] in flags, f.name
        else:
            assert ("moe", f.name) in have, f.name
    for f in dataclasses.fields(model_cls):
        if f.name not in NOT_FLAGS[model_cls]:
            assert ("model", f.name) in have, f.name
    for spec in have.values():
        assert len(spec.help) > 10, spec.key  # a help line from the field's metadata
    text = cmd.parser().format_help()
    assert "--codebook-dim" in text and "--moe-expert-parallel-size" in text and "--config-file" in text


def test_finetune_exposes_the_overridable_moe_fields_and_its_own():
    have = fields_by_flag(finetune.command_line())
    assert {n for s, n in have if s == "moe"} == set(finetune.MOE_OVERRIDABLE)
    for f in dataclasses.fields(finetune.FinetuneConfig):
        assert ("finetune", f.name) in have, f.name
    flags = finetune.command_line().all_flags()
    assert flags["--load"].key == "finetune.load" and flags["--resume"].key == "run.load"


CPU_CFG = f"{ROOT}/ds_configs/cpu_fp32.json"
# a valid, non-default value for every flag of the pretraining driver (written by hand, not derived from the code)
LM_VALUES = {
    "--model": "txl", "--vocab-size": "300", "--num-layers": "3", "--num-attention-heads": "2", "--hidden-size": "32",
    "--ffn-hidden-size": "48", "--seq-length": "16", "--mem-len": "8", "--hidden-dropout": "0.1",
    "--attention-dropout": "0.05", "--tie-embeddings": None, "--moe-layers": "0,2", "--expert-ffn-hidden-size": "40",
    "--init-method-std": "0.03",
    "--router": "vqmoe", "--num-experts": "6", "--top-k": "3", "--norm-topk-prob": None,
    "--moe-expert-parallel-size": "3",
    "--moe-activation": "silu", "--ffn-dropout": "0.2", "--capacity-factor": "1.5", "--eval-capacity-factor": "3.0",
    "--min-capacity": "2", "--drop-tokens": None, "--balance-loss-coef": "0.02",
    "--router-jitter": "0.01", "--codebook-size": "12", "--codebook-dim": "8", "--vq-kind": "residual",
    "--vq-distance": "l2", "--vq-scale": "code", "--vq-alpha": "0.1", "--vq-beta": "0.3", "--vq-ema": None, "--vq-ema-decay": "0.9",
    "--vq-kmeans-init": None, "--vq-kmeans-iters": "3", "--vq-dead-code-threshold": "0.5",
    "--vq-num-quantizers": "3", "--vqmoe-mode": "pretrain", "--freeze-vq": None, "--discrete-input": "token",
    "--xmoe-dim": "8", "--xmoe-init-temperature": "0.1", "--stablemoe-stage1-steps": "5",
    "--stablemoe-distill-dim": "4", "--stablemoe-distill-coef": "0.5", "--smoe-dropout-k-start": "2",
    "--smoe-dropout-k-end": "5", "--smoe-dropout-k-steps": "7", "--hash-table": "balanced", "--hash-seed": "3",
    "--cluster-warmup-steps": "9", "--cluster-distance": "l2",
    "--moe-router-load-balancing-type": "seq_aux_loss", "--moe-z-loss-coeff": "0.001",
    "--moe-router-score-function": "sigmoid", "--moe-router-topk-scaling-factor": "2.5",
    "--moe-router-top1-weight": "one",
    "--moe-router-enable-expert-bias": None, "--moe-router-bias-update-rate": "0.01",
    "--moe-router-force-load-balancing": None, "--moe-shared-expert-intermediate-size": "32",
    "--moe-shared-expert-mode": "gate", "--moe-per-layer-logging": None, "--moe-expert-impl": "loop",
    "--micro-batch-size": "4", "--gradient-accumulation-steps": "2", "--train-iters": "50", "--lr": "0.001",
    "--min-lr": "0.0001", "--lr-warmup-iters": "5", "--weight-decay": "0.01", "--clip-grad": "0.5", "--seed": "7",
    "--data-file": "corpus.txt", "--corpus-bytes": "12345", "--eval-seq-length": "12",
    "--out-dir": "runs/x", "--save": "ck", "--save-interval": "5", "--keep-last": "2", "--eval-interval": "10",
    "--eval-iters": "3", "--test-iters": "4", "--eval-batch-size": "6", "--log-interval": "2",
    "--max-skipped-steps": "4", "--progress": None, "--plots": None,
    "--dist-timeout-minutes": "5.0", "--deepspeed_config": CPU_CFG, "--data-path": None, "--load": ROOT,
    "--overwrite": None, "--upcycle-from": ROOT, "--eval-only": None,
}
# the GPT block's settings (not valid with --model txl above): round-tripped with --model gpt
GPT_VALUES = {"--normalization": "RMSNorm", "--norm-epsilon": "1e-06", "--swiglu": None,
              "--position-embedding-type": "rope", "--rotary-base": "5000.0", "--qk-norm": "hidden",
              "--add-bias-linear": None}
NEGATED = {"--tie-embeddings", "--drop-tokens", "--progress", "--plots", "--norm-topk-prob",
           "--add-bias-linear"}  # default True: --no-...


def _argv(values):
    argv = []
    for flag, v in values.items():
        if flag == "--data-path":  # exclusive with --data-file: round-tripped on its own below
            continue
        if v is None:
            argv.append("--no-" + flag[2:] if flag in NEGATED else flag)
        else:
            argv += [flag, v]
    return argv


def test_every_pretraining_flag_round_trips_through_the_resolved_file(tmp_path):
    cmd = lm.command_line()
    covered = {flag for flag, spec in cmd.all_flags().items() if not spec.cli_only and flag == spec.flag}
    assert covered == set(LM_VALUES) | set(GPT_VALUES), covered ^ (set(LM_VALUES) | set(GPT_VALUES))  # every setting
    parsed = cmd.parse(_argv(LM_VALUES))
    task = lm.make_task(parsed)
    cfg = task.model_config
    # spot checks against the table, field by field, so a flag wired to the wrong field fails here
    assert (cfg.model, cfg.n_layer, cfg.d_model, cfg.seq_len, cfg.mem_len, cfg.tie_embeddings) == \
        ("txl", 3, 32, 16, 8, False)
    assert (cfg.dropout, cfg.attn_dropout, cfg.expert_ffn, cfg.init_std, cfg.moe_layers) == (0.1, 0.05, 40, 0.03, "0,2")
    m = cfg.moe
    assert (m.top_k, m.ep_size, m.drop_tokens, m.codebook_dim, m.vq_kind, m.dropout) == \
        (3, 3, False, 8, "residual", 0.2)
    assert (m.vq_ema, m.vq_kmeans_init, m.freeze_vq, m.smoe_dropout_k_end) == (True, True, True, 5)
    assert (task.optim.lr, task.optim.seed, task.data.corpus_bytes, task.run.keep_last) == (0.001, 7, 12345, 2)
    assert (task.run.progress, task.run.plots, task.parallel.dist_timeout_minutes) == (False, False, 5.0)
    assert (m.score_function, m.expert_bias, m.shared_expert_size, task.run.moe_per_layer_logging) == \
        ("sigmoid", True, 32, True)
    # to the resolved file (what a run writes to config.json) and back, as JSON and as YAML
    written = cmd.resolved(parsed.preset, task.config_objects())
    import yaml

    for name, dump in (("c.json", json.dumps), ("c.yaml", yaml.safe_dump)):
        path = tmp_path / name
        path.write_text(dump(written))
        again = lm.make_task(cmd.parse(["--config-file", str(path)]))
        assert again.model_config == cfg
        for section in ("optim", "data", "run"):
            assert getattr(again, section) == getattr(task, section), section
        assert again.parallel.dist_timeout_minutes == 5.0
        assert cmd.resolved(again.parsed.preset, again.config_objects()) == written
    other = lm.make_task(cmd.parse(["--data-path", "data/enwik8"]))
    assert other.data.data_path == "data/enwik8" and other.data.data_file is None
    assert task.data.upcycle_from == ROOT


def test_gpt_block_flags_round_trip_through_the_resolved_file(tmp_path):
    cmd = lm.command_line()
    parsed = cmd.parse(["--model", "gpt", *_argv(GPT_VALUES)])
    task = lm.make_task(parsed)
    cfg = task.model_config
    assert (cfg.normalization, cfg.norm_epsilon, cfg.swiglu, cfg.position_embedding_type, cfg.rotary_base,
            cfg.qk_norm, cfg.add_bias_linear) == ("RMSNorm", 1e-6, True, "rope", 5000.0, "hidden", False)
    assert cfg.moe_config(0).activation == "swiglu" and not cfg.moe_config(0).linear_bias
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cmd.resolved(parsed.preset, task.config_objects())))
    assert lm.make_task(cmd.parse(["--config-file", str(path)])).model_config == cfg


def test_vision_and_finetune_resolved_files_round_trip(tmp_path):
    cmd = vision.command_line()
    parsed = cmd.parse(["--config", "small", "--router", "soft", "--soft-slots", "2", "--soft-normalize",
                        "--num-experts", "4", "--pool", "mean", "--dataset", "synthetic", "--num-classes", "12",
                        "--augment", "standard", "--crop-padding", "2", "--valid-size", "10"])
    task = vision.make_task(parsed)
    assert task.model_config.moe == {"num_experts": 4, "router": "soft", "slots_per_expert": 2, "normalize": True}
    path = tmp_path / "v.json"
    path.write_text(json.dumps(cmd.resolved(parsed.preset, task.config_objects())))
    again = vision.make_task(cmd.parse(["--config-file", str(path)]))
    assert again.model_config == task.model_config and again.data == task.data

    cmd = finetune.command_line()
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\na,x\n")
    argv = ["--load", str(tmp_path), "--task", "csv", "--train", str(csv), "--test", str(csv), "--mode", "frozen_router",
            "--pooling", "last", "--aux-loss-coef", "0.5", "--disable-moe-token-dropping", "--moe-expert-impl",
            "grouped", "--resume", str(tmp_path)]
    parsed = cmd.parse(argv)
    ft = parsed.build("finetune", finetune.FinetuneConfig)
    assert (ft.mode, ft.pooling, ft.aux_loss_coef) == ("frozen_router", "last", 0.5)
    assert parsed.given("moe") == {"drop_tokens": False, "expert_impl": "grouped"}
    assert parsed.build("run", lm.RunConfig).load == str(tmp_path)
    assert parsed.build("optim", lm.OptimConfig).train_iters == 200  # fine-tuning's own default


MEGATRON_ALIASES = [
    (["--topk", "1"], ["--top-k", "1"]),
    (["--moe-loss-coeff", "0.05"], ["--balance-loss-coef", "0.05"]),
    (["--moe-train-capacity-factor", "2.0"], ["--capacity-factor", "2.0"]),
    (["--moe-eval-capacity-factor", "4.0"], ["--eval-capacity-factor", "4.0"]),
    (["--moe-min-capacity", "1"], ["--min-capacity", "1"]),
    (["--disable-moe-token-dropping"], ["--no-drop-tokens"]),
    (["--untie-embeddings-and-output-weights"], ["--no-tie-embeddings"]),
    (["--init-std", "0.01"], ["--init-method-std", "0.01"]),
    (["--ep-size", "2"], ["--moe-expert-parallel-size", "2"]),
    (["--disable-bias-linear"], ["--no-add-bias-linear"]),
    (["--qk-layernorm"], ["--qk-norm", "head"]),
]


@pytest.mark.parametrize("alias,canonical", MEGATRON_ALIASES, ids=[a[0] for a, _ in MEGATRON_ALIASES])
def test_megatron_spellings_set_the_same_field(alias, canonical):
    cmd = lm.command_line()
    base = ["--router", "topk", "--num-experts", "4"]
    a, b = lm.model_config(cmd.parse(base + alias)), lm.model_config(cmd.parse(base + canonical))
    assert a == b
    assert a != lm.model_config(cmd.parse(base))  # and the setting did change something


def test_alias_and_flag_with_different_values_is_one_line():
    cmd = lm.command_line()
    with pytest.raises(ConfigError) as e:
        cmd.parse(["--top-k", "1", "--topk", "2"])
    assert str(e.value) == "--top-k 1 and --topk 2 both set moe.top_k to different values: give only one of them"
    with pytest.raises(ConfigError, match="both set moe.drop_tokens"):
        cmd.parse(["--drop-tokens", "--disable-moe-token-dropping"])
    assert cmd.parse(["--top-k", "2", "--topk", "2"]).given("moe") == {"top_k": 2}  # the same value twice is fine


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("config: base\nmoe:\n  router: topk\n  top_k: 1\noptim:\n  lr: 0.002\n  train_iters: 30\n")
    task = lm.make_task(lm.command_line().parse(["--config-file", str(path), "--top-k", "3"]))
    assert task.model_config.d_model == 256  # the file's named shape (base), not the default tiny
    assert task.model_config.moe.router == "topk" and task.model_config.moe.top_k == 3  # the flag wins
    assert task.optim.lr == 0.002 and task.optim.train_iters == 30
    task = lm.make_task(lm.command_line().parse(["--config-file", str(path), "--config", "tiny"]))
    assert task.model_config.d_model == 64


BAD_FILES = [
    ("moe:\n  topk: 2\n", "config file {p}: unknown key moe.topk (did you mean top_k?): remove it or fix its spelling"),
    ("model:\n  n_layers: 2\n", "unknown key model.n_layers (did you mean n_layer?)"),
    ("optimizer:\n  lr: 0.1\n", "unknown section 'optimizer' (did you mean optim?)"),
    ("model:\n  n_layer: '3'\n", "config file {p}: model.n_layer = '3' has type str, not int: write it as int"),
    ("run:\n  progress: 1\n", "run.progress = 1 has type int, not bool"),
    ("moe:\n  router: bogus\n", "moe.router = 'bogus' is not one of dense, topk"),
    ("moe:\n  vq_alpha: -1\n", "config file {p}: moe.vq_alpha: vq_alpha=-1.0 must be >= 0"),
    ("optim:\n  lr: .nan\n", "config file {p}: optim.lr: lr=nan is not a finite number"),
    ("config: huge\n", "config = 'huge' is not a named shape: choose one of tiny"),
    ("parallel:\n  local_rank: 3\n", "unknown key parallel.local_rank"),  # launcher-only settings
    ("- a\n- b\n", "holds a list, not a mapping of sections"),
    ("model: [1\n", "is not valid YAML"),
]


@pytest.mark.parametrize("text,words", BAD_FILES, ids=[w.split(":")[-1][:30] for _, w in BAD_FILES])
def test_bad_config_file_is_one_line(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        lm.make_task(lm.command_line().parse(["--config-file", str(path)]))
    msg = str(e.value)
    assert words.format(p=path) in msg and "\n" not in msg, msg


def test_config_file_that_is_not_there_or_not_json(tmp_path):
    cmd = lm.command_line()
    with pytest.raises(ConfigError, match="--config-file .*missing.json does not exist"):
        cmd.parse(["--config-file", str(tmp_path / "missing.json")])
    bad = tmp_path / "c.json"
    bad.write_text('{"moe": {"top_k": 2,}}')
    with pytest.raises(ConfigError, match=r"is not valid JSON \(line 1"):
        cmd.parse(["--config-file", str(bad)])


def test_help_and_choices_come_from_the_fields_not_their_source():
    """Each flag's help is its field's ``metadata["help"]`` and its choices are the field's ``Literal[...]`` values
    (no reading of source comments): a dataclass made at run time, with no source file, gets both."""
    import typing

    from vqmoe_ds.cli import CommandLine, Section
    from vqmoe_ds.fields import setting

    Made = dataclasses.make_dataclass("Made", [
        ("kind", typing.Literal["a", "b"], setting("a", "which kind of thing")),
        ("size", int, setting(3, "how many things"))])
    cmd = CommandLine("made", "a config without source", [Section("made", Made, "made")])
    specs = {s.name: s for s in cmd.specs["made"]}
    assert specs["kind"].help == "which kind of thing" and tuple(specs["kind"].choices) == ("a", "b")
    assert specs["kind"].type is str and specs["size"].help == "how many things" and specs["size"].choices is None
    with pytest.raises(ConfigError, match="--kind 'c': invalid choice, choose one of a, b"):
        cmd.parse(["--kind", "c"])
    for f in dataclasses.fields(MoEConfig):  # the shipped config: every Literal field is checked by the parser
        if typing.get_origin(typing.get_type_hints(MoEConfig)[f.name]) is typing.Literal:
            spec = next(s for s in lm.command_line().specs["moe"] if s.name == f.name)
            assert tuple(spec.choices) == typing.get_args(typing.get_type_hints(MoEConfig)[f.name])
