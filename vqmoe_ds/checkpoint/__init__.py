"""Checkpoints: the on-disk layout (``layout``), crash-safe save and exact resume (``store``), reading a run back
for fine-tuning, conversion, analysis and generation (``read``), resharding (``reshard``) and export
(``export``).  One error type, `CheckpointError`, for all of them."""
from .layout import (BEST, LATEST, MARKER, MODEL_FILE, ZERO_OPTIM_FILE, CheckpointError, expert_file, rank_file, read_latest,
                     resolve, step_tag, step_tags, verify, verify_checksums)
from .read import (PretrainedRun, StrictRemap, load_exported, load_for_inference, load_into, load_lm,
                   minimal_ds_config, read_run, tokenizer_for)
from .states import check_files, read_states, use_safe_loading
from .store import check_architecture, check_expert_files, load, module_buffers, prune, save

__all__ = ["BEST", "LATEST", "MARKER", "MODEL_FILE", "CheckpointError", "expert_file", "rank_file", "read_latest",
           "resolve", "step_tag", "step_tags", "verify", "verify_checksums", "PretrainedRun", "StrictRemap", "load_exported",
           "load_for_inference", "load_into", "load_lm", "minimal_ds_config", "read_run", "tokenizer_for",
           "check_architecture", "check_expert_files", "load", "module_buffers", "prune", "save", "check_files",
           "read_states", "use_safe_loading"]
