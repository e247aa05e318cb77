"""Language modelling as a task of the training loop, and the command line of ``pretrain_vqmoe.py``.

Batches come from ``training.data`` (GPT: shuffled windows; Transformer-XL: ordered segments whose memory
carries over); the metric is the validation NLL per token, reported also per byte, per character and as token and
word perplexity (``training.metrics``), over the whole split; every checkpoint records
the tokenizer, so tools decode its output away from the data folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..fields import setting
from ..cli import CommandLine, Parsed, Section, Shorthand
from ..models import NAMED, ModelConfig, build_model, count_params, flops_per_token, named_config, param_report
from ..moe.config import ConfigError, MoEConfig
from ..routers import fit_hash_tables
from .config import OptimConfig, ParallelConfig, RunConfig
from .data import TrainBatches, eval_batches, eval_sizes_ok, load_corpus
from .loop import Task, run
from .metrics import NLLMeter


@dataclass
class LMDataConfig:
    data_path: Optional[str] = setting(None, "prefix written by tools/preprocess_data.py "
                                             "(PREFIX.{train,valid,test}.bin/.idx)")
    data_file: Optional[str] = setting(None, "a text file read as bytes (vocab 256), split 90/5/5 in order")
    corpus_bytes: int = setting(2_000_000, "size of the default synthetic corpus, used when neither of the above is "
                                           "given")
    eval_seq_length: Optional[int] = setting(None, "evaluation window (TXL: tgt_len); default: --seq-length")
    upcycle_from: Optional[str] = setting(None, "a dense model's checkpoint: every expert starts as its layer's FFN "
                                                "(Megatron-core's --moe-use-upcycling); not read when resuming with "
                                                "--load")

    def __post_init__(self):
        if self.data_path and self.data_file:
            raise ConfigError("data_path and data_file both given: choose one (--data-path or --data-file)")
        if self.corpus_bytes < 1:
            raise ConfigError(f"corpus_bytes={self.corpus_bytes} must be >= 1")
        if self.eval_seq_length is not None and self.eval_seq_length < 1:
            raise ConfigError(f"eval_seq_length={self.eval_seq_length} must be >= 1")
        if self.upcycle_from is not None and not os.path.isdir(self.upcycle_from):
            raise ConfigError(f"upcycle_from={self.upcycle_from} is not a folder: give the --out-dir or checkpoint "
                              f"folder of a dense run")


MOE_DERIVED = MoEConfig.model_set_fields()  # MoEConfig fields the model config sets


def command_line() -> CommandLine:
    return CommandLine(
        "pretrain_vqmoe.py", "Pretrain a GPT or Transformer-XL language model with MoE / VQMoE layers on DeepSpeed.",
        [Section("model", ModelConfig, "model", exclude=("moe",), default_note="the --config shape's"),
         Section("moe", MoEConfig, "mixture of experts", exclude=MOE_DERIVED, default_note="the --config shape's"),
         Section("optim", OptimConfig, "optimisation"),
         Section("data", LMDataConfig, "data"),
         Section("run", RunConfig, "evaluation, logging, checkpoints", defaults={"eval_iters": 10}),
         Section("parallel", ParallelConfig, "distributed")],
        presets=NAMED, default_preset="tiny",
        shorthands=[Shorthand("--dropout", float, ("model.dropout", "model.attn_dropout", "moe.dropout"),
                              "sets --hidden-dropout, --attention-dropout and --ffn-dropout")])


def resolved_config_for(cfg: ModelConfig, out_dir: str) -> Dict[str, Any]:
    """The resolved configuration this driver writes, for a model made elsewhere (an imported checkpoint): the model
    and MoE sections of ``cfg``, the others at the driver's defaults, ``run.out_dir`` = ``out_dir``;
    ``--config-file`` reads it back to exactly ``cfg``."""
    cmd = command_line()
    parsed = cmd.parse(["--config", "olmoe-1b-7b", "--out-dir", out_dir])
    sections = {"optim": parsed.build("optim", OptimConfig), "data": parsed.build("data", LMDataConfig),
                "run": parsed.build("run", RunConfig), "parallel": parsed.build("parallel", ParallelConfig)}
    return cmd.resolved(parsed.preset, {"model": cfg, "moe": cfg.moe.settings(), **sections})


def model_config(parsed: Parsed, vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig of the preset (``--config``) with the given model and MoE settings on top; the vocabulary
    given, else ``vocab_size`` (the data's)."""
    given = parsed.given("model")
    name = parsed.preset
    model = given.get("model", NAMED[name].get("model", "gpt"))
    seq = given.get("seq_len", NAMED[name]["seq_len"])
    given.setdefault("mem_len", seq if model == "txl" else 0)
    given.setdefault("vocab_size", vocab_size or 256)
    return parsed.checked("model", lambda: named_config(name, moe=parsed.given("moe"), **given))


class LanguageModelling(Task):
    metric, higher_is_better, unit = "loss", False, "tokens"
    default_micro_batch = 8
    section = ("data", LMDataConfig)

    def __init__(self, *args):
        super().__init__(*args)
        self.model_config = model_config(self.parsed)  # every model setting checked before any data is read
        self.mems = self._mems_before = None
        self.upcycle_source = self.upcycled = None

    def load(self) -> None:
        d = self.data
        vocab = self.parsed.given("model").get("vocab_size")
        self.corpus = load_corpus(d.data_path, d.data_file, d.corpus_bytes, self.optim.seed, vocab)
        self.model_config = cfg = model_config(self.parsed, vocab or self.corpus.vocab_size)
        self.eval_len = d.eval_seq_length or cfg.seq_len
        if cfg.model == "gpt" and self.eval_len > cfg.seq_len:
            raise ConfigError(f"--eval-seq-length {self.eval_len} exceeds the GPT context {cfg.seq_len}: lower it")
        if d.upcycle_from and not self.run.load:  # checked before the process group; copied in build_model
            from ..checkpoint.upcycle import check_upcycle

            self.upcycle_source = check_upcycle(cfg, d.upcycle_from)

    def shard(self, micro_batch: int, eval_batch: int) -> None:
        cfg = self.model_config
        self.eval_bs = eval_batch
        self.batches = TrainBatches(self.corpus.streams["train"], cfg.model, micro_batch, cfg.seq_len, self.rank,
                                    self.world, self.optim.seed)
        for split in ("valid", "test"):
            if split in self.corpus.streams:
                eval_sizes_ok(self.corpus.streams[split], cfg.model, eval_batch, self.eval_len, self.world, split)

    def build_model(self) -> torch.nn.Module:
        self.model = build_model(self.model_config)
        if self.upcycle_source is not None:
            from ..checkpoint.upcycle import upcycle

            self.upcycled = upcycle(self.model, self.upcycle_source)
        if self.model_config.moe.hash_table == "balanced":  # hash routing balanced by the data's ids
            fit_hash_tables(self.model, self.corpus.token_counts("train"))
        return self.model

    # ---- training ----------------------------------------------------------------------------------------
    def micro_step(self, engine):
        x, y = next(self.batches)
        if self.batches.new_epoch:
            self.mems = None
        _, loss, aux, self.mems = engine(x.to(self.device), y.to(self.device), self.mems)
        return loss, aux, {"tokens": x.numel()}

    def begin_step(self) -> None:
        self._mems_before = self.mems

    def undo_step(self) -> None:
        self.mems = self._mems_before

    def train_record(self, sums: Dict[str, float]) -> Dict[str, Any]:
        return {"flops_per_s": sums["tokens"] / sums["seconds"] * flops_per_token(self.model_config)}

    # ---- evaluation --------------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return split in self.corpus.streams

    def evaluate(self, engine, split: str, max_batches: int) -> Dict[str, Any]:
        """Every token of the split once (``max_batches`` 0), padding masked out of the model and the sums;
        the metrics of ``training.metrics.lm_metrics`` with the split's text counts."""
        meter, mems = NLLMeter(), None
        for x, y, mask in eval_batches(self.corpus.streams[split], self.model_config.model, self.eval_bs,
                                       self.eval_len, self.rank, self.world, max_batches):
            mask = mask.to(self.device)
            logits, _, _, mems = engine(x.to(self.device), None, mems, mask)
            meter.add(logits, y.to(self.device), mask)
        return meter.all_reduce().summary(self.corpus.split_counts(split))

    def describe_eval(self, split: str, res: Dict[str, Any]) -> str:
        return describe_lm_metrics(res)

    # ---- state ---------------------------------------------------------------------------------------------
    def rank_state(self) -> Optional[Dict[str, Any]]:
        return {"mems": self.mems}

    def load_rank_state(self, state: Optional[Dict[str, Any]]) -> None:
        mems = (state or {}).get("mems")
        self.mems = [m.to(self.device) for m in mems] if mems else None

    def client_state(self) -> Dict[str, Any]:
        return {"tokenizer": self.corpus.tokenizer_state()}

    # ---- reports -------------------------------------------------------------------------------------------
    def config_objects(self) -> Dict[str, Any]:
        cfg = self.model_config
        return {"model": cfg, "moe": cfg.moe.settings(), "optim": self.optim, "data": self.data, "run": self.run,
                "parallel": self.parallel}

    def describe(self) -> str:
        cfg = self.model_config
        absent = "".join(f"; no {s} split ({why}): {SPLIT_ABSENT[s]}" for s, why in self.corpus.missing.items())
        uncounted = [s for s in ("valid", "test") if s in self.corpus.streams and self.corpus.split_counts(s) is None]
        if uncounted:
            absent += (f"; the tokenizer.json records no text counts of {'/'.join(uncounted)}: bits per byte/char "
                       f"and word perplexity are not reported (re-run tools/preprocess_data.py to record them)")
        upcycled = "" if self.upcycled is None else (f"; upcycled from {self.upcycled['source']} (every expert its "
                                                     f"layer's dense FFN)")
        return f"{describe_shape(cfg)}; {param_report(self.model, cfg)}; data: {self.corpus.source}{absent}{upcycled}"

    def run_info(self) -> Dict[str, Any]:
        return {"params": count_params(self.model_config), "data": self.corpus.source}


SPLIT_ABSENT = {"valid": "no validation, no best checkpoint; the test runs on the final weights",
                "test": "the run ends without a test"}


def describe_shape(cfg: ModelConfig) -> str:
    """The effective shape of a model config in one phrase (what the start-up banner prints)."""
    m = cfg.moe_config(cfg.moe_layer_ids()[0]) if cfg.is_moe else None
    ctx = f"context {cfg.seq_len}" if cfg.model == "gpt" else f"segment {cfg.seq_len}, memory {cfg.mem_len}"
    out = (f"model {cfg.model}: {cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads, FFN {cfg.d_inner}, "
           f"vocab {cfg.vocab_size}, {ctx}")
    if m is None:
        return out + ", dense"
    layers = "" if len(cfg.moe_layer_ids()) == cfg.n_layer else f" in layers {cfg.moe_layers}"
    out += (f", {m.router} MoE{layers}: {m.num_experts} experts of FFN {m.ffn_hidden_size}, top-{m.top_k}"
            f", ep {m.ep_size}")
    if m.router in ("vqmoe", "vq"):
        out += f", codebook {m.codebook_size}"
    return out


def describe_lm_metrics(res: Dict[str, Any]) -> str:
    """One log line of ``lm_metrics``, every value named by its unit."""
    def ppl(v: float) -> str:
        return f"{v:.3f}" if v < 1e5 else f"{v:.4g}"

    out = (f"loss {res['loss']:.4f} nats/token, {res['bits_per_token']:.4f} bits/token, "
           f"token ppl {ppl(res['token_ppl'])}")
    if "bits_per_byte" in res:
        out += (f", {res['bits_per_byte']:.4f} bits/byte, {res['bits_per_char']:.4f} bits/char, "
                f"word ppl {ppl(res['word_ppl'])}")
    out += f" over {res['tokens']} tokens"
    frac = res.get("evaluated_fraction")
    if frac is not None and frac < 1:
        out += f" ({100 * frac:.1f}% of the split: the per-byte/char/word values are estimates)"
    elif frac is not None:
        out += " (the whole split)"
    return out


make_task = LanguageModelling.from_parsed


def main(argv: Optional[List[str]] = None) -> int:
    return run(command_line(), make_task, argv)


def cli() -> None:
    """The console script ``vqmoe-pretrain`` (setup.py); the same as the driver script."""
    from ..parallel import exit_process

    exit_process(main())


__all__ = ["LMDataConfig", "LanguageModelling", "command_line", "model_config", "make_task", "main",
           "resolved_config_for", "cli"]
