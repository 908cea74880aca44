"""Passes and the explicit registry of pass names.

``PASSES`` maps each kebab-case name to its class; it is a plain dict built here,
not by import side effects, so what is registered is visible in one place.
"""

from qcompile.passes.annotate_costs import AnnotateCosts
from qcompile.passes.base import Pass, PassContext, PassResult
from qcompile.passes.channel_decomp import ChannelDecomposition
from qcompile.passes.cp_decomp import CPDecomposition
from qcompile.passes.dead_code import DeadCode
from qcompile.passes.distill import Distill
from qcompile.passes.finetune import Finetune
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.layer_config import LayerConfigPass
from qcompile.passes.lowrank_svd import LowRankSVD
from qcompile.passes.prune_channels import PruneChannels
from qcompile.passes.qaf import QAF
from qcompile.passes.quantize import Quantize
from qcompile.passes.spatial_svd import SpatialSVD
from qcompile.passes.tucker2 import Tucker2
from qcompile.passes.manager import PassManager, Sequential
from qcompile.passes.pipeline import format_pipeline, parse_pipeline

PASSES: dict[str, type[Pass]] = {p.name: p for p in (FoldBatchNorm, DeadCode, AnnotateCosts, LowRankSVD, SpatialSVD,
                                                     Tucker2, CPDecomposition, ChannelDecomposition, Quantize,
                                                     PruneChannels, QAF, LayerConfigPass, Finetune, Distill)}

__all__ = ["PASSES", "AnnotateCosts", "CPDecomposition", "ChannelDecomposition", "DeadCode", "Distill", "Finetune", "FoldBatchNorm",
           "LayerConfigPass", "LowRankSVD", "PruneChannels", "Quantize", "SpatialSVD", "Tucker2", "Pass", "PassContext", "PassManager",
           "PassResult", "Sequential", "format_pipeline", "parse_pipeline"]
