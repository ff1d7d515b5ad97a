"""Alignment engine: transport specs, permutation/OT solvers, and model fusion (pure PyTorch + POT + scipy).

A model is described as groups of hidden units (:class:`TransportSpec`, derived with ``torch.fx`` by
:func:`derive_spec`); a solver returns one transport per group; :func:`apply_transport` re-indexes a
model with them; :func:`fuse` aligns N models to a common target and averages them.
"""

from fedfuse.align import (
    heads,  # noqa: F401  (keeps only the head sets a derived spec can merge)
    peft_lora,  # noqa: F401  (registers the PEFT LoRA spec with derive_spec)
)
from fedfuse.align.bn import reset_bn_stats
from fedfuse.align.fusion import AlignmentError, align, fuse, gromov_wasserstein_barycenter, wasserstein_barycenter
from fedfuse.align.repair import repair  # the function (the module is fedfuse.align.repair)
from fedfuse.align.rules import register_rule
from fedfuse.align.solvers import activation_matching, infer_example_input, ot_coupling, ot_transport, weight_matching
from fedfuse.align.spec import Axis, Blocks, Group, Site, TransportSpec, UnsupportedModelError, derive_spec
from fedfuse.align.transport import apply_transport, permute_model

__all__ = [
    "Axis",
    "Blocks",
    "Group",
    "Site",
    "TransportSpec",
    "UnsupportedModelError",
    "AlignmentError",
    "activation_matching",
    "align",
    "apply_transport",
    "derive_spec",
    "fuse",
    "gromov_wasserstein_barycenter",
    "infer_example_input",
    "ot_coupling",
    "ot_transport",
    "permute_model",
    "repair",
    "register_rule",
    "reset_bn_stats",
    "wasserstein_barycenter",
    "weight_matching",
]
