"""Automated multi-objective compression search (issue 7): per-layer configuration space,
workload-keyed latency cache, latency predictor, NSGA-II over per-layer choices."""

from qcompile.search.latency_cache import LatencyCache, workload_key
from qcompile.search.nsga import Budget, Point, SearchResult, non_dominated, search
from qcompile.search.predictor import LatencyPredictor
from qcompile.search.space import LayerConfig, SearchSpace

__all__ = ["Budget", "LatencyCache", "LatencyPredictor", "LayerConfig", "Point", "SearchResult", "SearchSpace",
           "non_dominated", "search", "workload_key"]
