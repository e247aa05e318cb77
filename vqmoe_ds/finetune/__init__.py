"""Fine-tuning pretrained (VQ)MoE language models as classifiers (discrete path only, both paths, or the
SMoE-Dropout protocol), and reading pretraining checkpoints back for the tools."""
from .model import SequenceClassifier, pool
from .pretrained import (CheckpointError, PretrainedRun, StrictRemap, discrete_only_config, load_lm, read_run,
                         tokenizer_for)

__all__ = ["SequenceClassifier", "pool", "CheckpointError", "PretrainedRun", "StrictRemap", "discrete_only_config",
           "load_lm", "read_run", "tokenizer_for"]
