"""Image classification with MoE / VQMoE / SoftMoE ViTs: the model (`vit`), SoftMoE (`soft_moe`), dataset
readers and the synthetic task (`datasets`), augmentation (`augment`) and image classification as a task of
the training loop (`task`, behind ``train_vision.py``)."""
from .soft_moe import SoftMoE, SoftMoEConfig
from .vit import NAMED, ViT, ViTConfig, build_vit, count_params, moe_ffn_layers, vit_config

__all__ = ["SoftMoE", "SoftMoEConfig", "ViT", "ViTConfig", "NAMED", "build_vit", "count_params", "vit_config",
           "moe_ffn_layers"]
