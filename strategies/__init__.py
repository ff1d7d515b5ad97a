"""fedfuse's Flower server side: strategies usable in any ServerApp, and fedfuse's own ServerApp."""

from strategies.base import FedFuseStrategy
from strategies.fusion import FedCCA, FedFusion, FedGWB, FedMatch, FedWB, FedZip
from strategies.heterofl import HeteroFL
from strategies.layerwise import LayerwiseAvg
from strategies.lora import AlignedLoRA, FedAvgLoRA, FedExLoRA, FLoRA, HetLoRA, SVDLoRA
from strategies.pfn import FedPFN, FedPNU
from strategies.prox import FedProx

__all__ = [
    "FedCCA",
    "FedFuseStrategy",
    "FedFusion",
    "FedGWB",
    "FedMatch",
    "FedPFN",
    "FedPNU",
    "FedProx",
    "FedWB",
    "HeteroFL",
    "FedZip",
    "LayerwiseAvg",
    "FedAvgLoRA",
    "FedExLoRA",
    "AlignedLoRA",
    "SVDLoRA",
    "HetLoRA",
    "FLoRA",
]
