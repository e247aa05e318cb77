"""Routing analysis: consistency (Definition 4.1 of the paper), purity / NMI against known clusters, load
summaries."""
from .metrics import consistency_score, load_summary, nmi, purity

__all__ = ["consistency_score", "purity", "nmi", "load_summary"]
