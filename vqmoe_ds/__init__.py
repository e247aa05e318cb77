"""vqmoe-ds: Vector-Quantized Mixture-of-Experts language models and their baselines on DeepSpeed."""
__version__ = "0.1.0"
