"""Quantizers that map a token to a discrete code: codebook VQ (L2 / cosine, low-dim), residual VQ, LFQ."""
from .codebook import CodebookQuantizer, QuantizerOutput, nearest_codes, resolve_group
from .lfq import LFQQuantizer
from .residual import ResidualQuantizer


def build_quantizer(cfg):
    """The quantizer a `MoEConfig` asks for."""
    common = dict(beta=cfg.vq_beta, ema=cfg.vq_ema, ema_decay=cfg.vq_ema_decay, kmeans_init=cfg.vq_kmeans_init,
                  kmeans_iters=cfg.vq_kmeans_iters, dead_code_threshold=cfg.vq_dead_code_threshold)
    if cfg.vq_kind == "codebook":
        q = CodebookQuantizer(cfg.hidden_size, cfg.codebook_size, cfg.codebook_dim, distance=cfg.vq_distance,
                              scale=cfg.vq_scale, **common)
    elif cfg.vq_kind == "residual":
        q = ResidualQuantizer(cfg.hidden_size, cfg.codebook_size, cfg.vq_num_quantizers, cfg.codebook_dim, **common)
    else:
        q = LFQQuantizer(cfg.hidden_size, cfg.codebook_size, beta=cfg.vq_beta)
    return q.freeze(cfg.freeze_vq) if cfg.freeze_vq else q


__all__ = ["CodebookQuantizer", "ResidualQuantizer", "LFQQuantizer", "QuantizerOutput", "build_quantizer",
           "nearest_codes", "resolve_group"]
