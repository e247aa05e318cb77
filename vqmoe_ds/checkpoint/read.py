"""A run's checkpoint, read back outside the run that wrote it: which folder and tag, the model config it was
trained with, its resolved run configuration, the tokenizer of its data, and its weights loaded into a (possibly
reshaped) model.

Fine-tuning, the training-free conversion, the routing analysis, the embedding tool, generation and export all
start here.  Weights are loaded with ``engine.load_checkpoint(..., load_module_only=True, custom_load_fn=...)``,
so DeepSpeed finds and re-maps the expert files for any expert-parallel size, and `StrictRemap` says exactly
which keys may differ between the checkpoint and the new model (a dropped LM head, the continuous router of a
discrete-only layer, a new classifier); any other difference is a one-line error instead of a silently
half-loaded model.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..models import ModelConfig
from .layout import MARKER, MODEL_FILE, CheckpointError, resolve, verify
from .states import check_files, read_states, use_safe_loading
from .store import check_expert_files


@dataclass
class PretrainedRun:
    save_dir: str  # the folder DeepSpeed saved into (holds ``latest`` and one folder per tag)
    tag: str
    model_config: ModelConfig
    client_state: Dict[str, Any]
    run_config: Dict[str, Any] = field(default_factory=dict)  # the run's resolved config ({} if not found)

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.tag)

    @property
    def data_config(self) -> Dict[str, Any]:
        """The run's data settings (data_path, data_file, corpus_bytes) and its seed."""
        return {**self.run_config.get("data", {}), "seed": self.run_config.get("optim", {}).get("seed", 0)}


def read_run(path: str, tag: Optional[str] = None, run_config: Optional[str] = None) -> PretrainedRun:
    """The checkpoint's metadata (no model is built), after verifying it is complete.  ``run_config``: the run's
    config.json when it does not lie beside the checkpoint folder (the drivers write it to OUT_DIR, and the
    default --save is OUT_DIR/checkpoints); the checkpoint's own copy is used when there is none."""
    save_dir, tag = resolve(path, tag)
    marker = verify(save_dir, tag)
    check_files(save_dir, tag, marker)
    state = read_states(os.path.join(save_dir, tag, MODEL_FILE), mmap=True)
    # the model config lives in the marker (checkpoints of the earlier format also kept it in the client state)
    model_config = marker.get("model_config") or state.get("model_config")
    if not model_config:
        raise CheckpointError(f"{os.path.join(save_dir, tag)} records no model config (its {MARKER} has no "
                              f"model_config): it was not written by a vqmoe-ds driver or tool")
    client = {k: v for k, v in state.items() if k in ("step", "best_valid", "world_size", "converted_from",
                                                       "finetune", "tokenizer")}
    cfg = ModelConfig.from_dict(model_config)
    if run_config is None:
        cand = os.path.join(os.path.dirname(os.path.normpath(save_dir)), "config.json")
        run_config = cand if os.path.isfile(cand) else None
    elif not os.path.isfile(run_config):
        raise CheckpointError(f"--run-config {run_config} does not exist: give the pretraining run's config.json")
    rc = marker.get("config") or {}
    if run_config:
        with open(run_config) as f:
            rc = json.load(f)
    return PretrainedRun(save_dir, tag, cfg, client, rc)


def tokenizer_for(run: PretrainedRun, meta_path: Optional[str] = None):
    """The tokenizer of the run's data.  In order: ``meta_path``; the tokenizer the checkpoint recorded (the
    driver saves it in the client state, so a checkpoint saved away from its run folder still decodes
    right); ``<data_path>.tokenizer.json`` of the run's config; else bytes (``--data-file`` and the default
    corpus are read as bytes)."""
    from ..data import TokenizerMeta, check_vocab
    from ..data.tokenizers import ByteTokenizer, Tokenizer

    recorded = run.client_state.get("tokenizer")
    if meta_path is None and recorded is not None:
        if recorded.get("kind") == "byte" and "dtype" not in recorded:
            return ByteTokenizer()
        meta = TokenizerMeta(**recorded)
        check_vocab(meta, run.model_config.vocab_size)
        return Tokenizer.from_metadata(meta)
    data_path = run.data_config.get("data_path")
    if meta_path is None and data_path:
        meta_path = data_path + ".tokenizer.json"
    if meta_path is None:
        if run.model_config.vocab_size != 256:  # bytes would feed it ids it never saw, or decode ids >= 256 wrongly
            raise CheckpointError(f"the model has vocab_size {run.model_config.vocab_size}, not the 256 of bytes, but "
                                  f"{run.path} records no tokenizer and its run has no --data-path: pass "
                                  f"--tokenizer-meta PREFIX.tokenizer.json of its data (an imported model: import it "
                                  f"again with tools/convert_hf.py --tokenizer)")
        return ByteTokenizer()
    meta = TokenizerMeta.load(meta_path)
    if recorded is not None and (recorded.get("kind"), recorded.get("vocab_size", 256)) != (meta.kind, meta.vocab_size):
        raise CheckpointError(f"{run.path} was trained on {recorded.get('kind')} tokens (vocabulary "
                              f"{recorded.get('vocab_size', 256)}), --tokenizer-meta {meta_path} is {meta.kind} "
                              f"({meta.vocab_size}): leave out --tokenizer-meta (the checkpoint records its tokenizer) "
                              f"or give the tokenizer of its data")
    check_vocab(meta, run.model_config.vocab_size)
    return Tokenizer.from_metadata(meta)


class StrictRemap:
    """``custom_load_fn`` for ``engine.load_checkpoint``: source key k goes to ``prefix + k``; the source keys
    matching ``may_drop`` need not exist in the destination, the destination keys matching ``may_be_new`` need
    not exist in the source; every other mismatch (or a shape mismatch) raises `CheckpointError`.
    ``report`` lists what was dropped and what stayed new."""

    def __init__(self, prefix: str = "", may_drop: Sequence[str] = (), may_be_new: Sequence[str] = (),
                 where: str = "the checkpoint"):
        self.prefix, self.may_drop, self.may_be_new, self.where = prefix, list(may_drop), list(may_be_new), where
        self.report: Dict[str, List[str]] = {}

    @staticmethod
    def _match(key, patterns):
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    def __call__(self, src: Dict[str, torch.Tensor], dst: nn.Module) -> None:
        mapped = {self.prefix + k: v for k, v in src.items()}
        want = dst.state_dict()
        dropped = sorted(k for k in mapped if k not in want)
        new = sorted(k for k in want if k not in mapped)
        bad_drop = [k for k in dropped if not self._match(k, self.may_drop)]
        bad_new = [k for k in new if not self._match(k, self.may_be_new)]
        if bad_drop or bad_new:
            raise CheckpointError(
                f"{self.where} does not fit the model: {len(bad_drop)} unexpected key(s) {bad_drop[:3]}, "
                f"{len(bad_new)} missing key(s) {bad_new[:3]}: load a checkpoint of the same architecture "
                f"(check --moe-expert-parallel-size and the run's config)")
        for k, v in mapped.items():
            if k in want and tuple(want[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{self.where}: {k} has shape {tuple(v.shape)}, the model expects "
                                      f"{tuple(want[k].shape)}: load a checkpoint of the same architecture")
        dst.load_state_dict({k: v for k, v in mapped.items() if k in want}, strict=False)
        self.report = {"dropped": dropped, "new": new}


def load_into(engine, run: PretrainedRun, remap: StrictRemap) -> Dict[str, List[str]]:
    """Load the run's weights (module only: no optimizer, scheduler or step) into the engine's model."""
    use_safe_loading(engine)
    path, _ = engine.load_checkpoint(run.save_dir, tag=run.tag, load_module_strict=False,
                                     load_optimizer_states=False, load_lr_scheduler_states=False,
                                     load_module_only=True, custom_load_fn=remap)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {run.path}")
    return remap.report


def minimal_ds_config(micro_batch: int = 1) -> Dict[str, Any]:
    """An engine config for tools that only run forward passes (no optimizer)."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}


def load_lm(path: str, tag: Optional[str] = None, cfg: Optional[ModelConfig] = None, run_config: Optional[str] = None,
            may_drop: Sequence[str] = (), run: Optional[PretrainedRun] = None):
    """For single-process tools: (model in eval mode, run, engine) with the run's weights, through a DeepSpeed
    engine without optimizer, at expert parallelism 1 (DeepSpeed names expert files by global id, so any ep
    size loads).  ``cfg``: another config to build (e.g. discrete-only) -- ``may_drop`` then names the source
    keys it lacks on purpose.  ``run``: the checkpoint as `read_run` returned it (verified), so that a tool that
    read it already does not verify it twice; else ``path`` and ``tag`` are read here."""
    import deepspeed

    from ..models import build_model
    from ..parallel import init_single_process

    run = run or read_run(path, tag, run_config)
    init_single_process()
    cfg = cfg or run.model_config.replace_moe(ep_size=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    check_expert_files(run.save_dir, run.tag, model)
    engine, _, _, _ = deepspeed.initialize(model=model, config=minimal_ds_config())
    load_into(engine, run, StrictRemap(may_drop=may_drop, where=run.path))
    model.eval()
    return model, run, engine


def load_for_inference(load_dir: str, tag: Optional[str] = None, run: Optional[PretrainedRun] = None):
    """The model of a checkpoint, rebuilt in one process at expert parallelism 1 (``run``: already read, see
    `load_lm`).  Returns (model in eval mode, ModelConfig, tag)."""
    model, run, _ = load_lm(load_dir, tag, run=run)
    return model, model.cfg, run.tag


def load_exported(path: str):
    """A model from ``tools/export_checkpoint.py``'s ``FILE.safetensors`` + ``FILE.json``, after checking both against
    ``FILE.sha256.json`` (no DeepSpeed checkpoint machinery, nothing unpickled; the MoE layers still need a
    one-process group).  Returns (model, ModelConfig)."""
    from safetensors.torch import load_file

    from ..models import build_model
    from ..parallel import init_single_process
    from .manifest import file_manifest_path, verify_manifest

    cfg_path = os.path.splitext(path)[0] + ".json"
    for p in (path, cfg_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} does not exist: export the checkpoint with tools/export_checkpoint.py")
    verify_manifest(file_manifest_path(path), os.path.dirname(os.path.abspath(path)), what=path)
    with open(cfg_path) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta["model_config"])
    init_single_process()
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model of {cfg_path} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}): re-export it")
    model.eval()
    return model, cfg
