"""Fine-tuning pretrained (VQ)MoE language models as classifiers (discrete path only, both paths, or the
SMoE-Dropout protocol), the training-free conversion, and the embedding evaluation."""
from .discrete import absent_path_keys, discrete_only_config, freeze_routing, vqmoe_layer_ids
from .model import SequenceClassifier, pool

__all__ = ["SequenceClassifier", "pool", "absent_path_keys", "discrete_only_config", "freeze_routing",
           "vqmoe_layer_ids"]
