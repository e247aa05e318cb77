"""Routing analysis: consistency (Definition 4.1 of the paper), purity / NMI against known clusters, load
summaries; forward-hook probes of what MoE layers did, measured expert FLOPs, routing stability across
checkpoints, k-means centres and the representation-collapse view."""
from .collapse import effective_rank, pca_2d, plot_collapse
from .expert_flops import ExpertFlopsCounter
from ..quantizers.kmeans import kmeans
from .metrics import consistency_score, load_summary, nmi, purity
from .routing_probe import LayerRecord, RoutingProbe, expert_of
from .stability import routing_stability, stability_series

__all__ = ["consistency_score", "purity", "nmi", "load_summary", "ExpertFlopsCounter", "RoutingProbe", "LayerRecord",
           "expert_of", "kmeans", "routing_stability", "stability_series", "effective_rank", "pca_2d",
           "plot_collapse"]
