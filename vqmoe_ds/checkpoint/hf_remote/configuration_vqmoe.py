"""Configuration of a VQMoE language model exported by vqmoe-ds (``tools/export_checkpoint.py --format hf``).

OLMoE's configuration plus the VQMoE layer's settings: the codebook (K codes, the distance, an optional low
dimension, how the quantized token is scaled), the discrete path's input and the mode (``pretrain``: the top-k
experts and the code's expert mixed by a 2-way gate, eq. 4-5 of arXiv 2411.19402; ``discrete_only``: the code's
expert alone, eq. 7), and the top-k router's options.  ``modeling_vqmoe.py`` beside it builds the model.
"""
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig


class VQMoEOlmoeConfig(OlmoeConfig):
    model_type = "vqmoe_olmoe"

    codebook_size: int = 64  # K; the discrete path sends code c to expert c mod num_experts
    codebook_dim: int | None = None  # None: codes live in the model dimension; else in this projected dimension
    vq_distance: str = "cosine"  # nearest code by "l2" or "cosine" distance
    vq_scale: str = "token"  # cosine codes in the model dimension: "token" scales the unit code by |x|, "code": as is
    discrete_input: str = "quantized"  # the discrete expert reads the quantized token ("quantized") or x ("token")
    vqmoe_mode: str = "pretrain"  # "pretrain": both paths mixed by the gate; "discrete_only": the code's expert only
    router_score_function: str = "softmax"  # top-k scores: "softmax" over the experts or a "sigmoid" per expert
    router_topk_scaling_factor: float = 1.0  # the top-k combine weights times this
    router_expert_bias: bool = False  # a per-expert bias added to the scores for the choice of experts only


__all__ = ["VQMoEOlmoeConfig"]
