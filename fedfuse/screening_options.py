"""The screening and robust-reduction run options, as data (no torch): the CLI checks them without loading the
core's maths; :mod:`fedfuse.screening` and :mod:`fedfuse.robust` apply them."""

from __future__ import annotations

from fedfuse.config import Option

__all__ = [
    "ROBUST_METHODS",
    "NORM_ACTIONS",
    "DIRECTION_GUARDS",
    "UPDATE_NORM_BOUND",
    "EXAMPLES_CAP",
    "EXAMPLES_BOUND",
    "MIN_UPDATE_COSINE",
    "TRUSTED_DATA",
    "INFLUENCE_Z",
    "DUPLICATE_COSINE",
    "SCREENING_OPTIONS",
    "ROBUST_OPTIONS",
]

ROBUST_METHODS = ("none", "median", "trimmed-mean", "krum")
NORM_ACTIONS = ("clip", "reject")
DIRECTION_GUARDS = ("median", "off")
UPDATE_NORM_BOUND = 3.0  # × the round's median per-step update norm × the client's (capped) steps
EXAMPLES_CAP = 10.0  # claims clipped to × the round's median (weight) or 70th percentile (steps)
EXAMPLES_BOUND = 0.0  # reject claims above × the median (off: the cap makes a large claim harmless)
MIN_UPDATE_COSINE = -1.0  # off: honest non-IID updates reach cosine -0.27 with the median update
INFLUENCE_Z = 2.0  # with trusted data: an outsized update is cut where the server's examples show harm at this z
# updates at this cosine or above with each other (after the guard) share one client's weight: omniscient colluders
# (alie, ipm, evade, lowkey) send one vector (cosine 0.9989-1.0), honest ones reached at most 0.944 (digits) and
# 0.950 (mnist1d) over 15-round clean runs (Dirichlet 0.1/1, quantity 0.3, iid; 3 seeds each)
DUPLICATE_COSINE = 0.99
TRUSTED_DATA = 100  # server-held labelled examples for the guard's reference (the whole split when it holds fewer)

SCREENING_OPTIONS = (
    Option("update-norm-bound", float, UPDATE_NORM_BOUND,
           "an update norm above this × the round's median norm per local step × the client's local steps "
           "is clipped (or rejected) (0 = off)", low=0.0),
    Option("update-norm-action", str, "clip", "what update-norm-bound does", choices=NORM_ACTIONS),
    Option("examples-cap", float, EXAMPLES_CAP,
           "a claimed num-examples (aggregation weight) above this × the round's median counts as this × the "
           "median; claimed local steps likewise, relative to the round's 70th percentile (0 = off)", low=0.0),
    Option("examples-bound", float, EXAMPLES_BOUND,
           "a num-examples above this × the round's median is rejected (0 = off)", low=0.0),
    Option("min-update-cosine", float, MIN_UPDATE_COSINE,
           "an update whose cosine with the round's median update is below this is rejected (-1 = off)",
           low=-1.0, high=1.0),
    Option("direction-guard", str, "median",
           "median: remove the part of each update pointing against the round's median update, and down-weight it",
           choices=DIRECTION_GUARDS),
    Option("influence-z", float, INFLUENCE_Z,
           "with trusted-data: an update whose influence (weight × norm) exceeds 2 × the round's median is cut to "
           "the median's (a tenth of it if its full size raises the loss), as is one whose claimed weight alone "
           "exceeds 2 × the median's, and any update whose own step raises "
           "the loss keeps a tenth of the median's, where the loss on the server's examples shows it at this "
           "z-score (0 = off)",
           low=0.0),
    Option("duplicate-cosine", float, DUPLICATE_COSINE,
           "updates whose cosine with each other is at least this (near-identical: colluders sending one vector) "
           "share one client's weight, the mean of their claims (0 = off)", low=0.0, high=1.0),
)  # fmt: skip
ROBUST_OPTIONS = (
    Option(
        "robust", str, "none",
        "reduction of the (aligned) client models: weighted average, or unweighted coordinate median, trimmed "
        "mean, multi-Krum", choices=ROBUST_METHODS,
    ),
    Option("robust-fraction", float, 0.2, "robust: assumed Byzantine fraction (trimmed per side; Krum's f)",
           low=0.0, high=0.49),
    *SCREENING_OPTIONS,
    Option("trusted-data", int, TRUSTED_DATA,
           "N labelled examples the server holds (FLTrust's root data): the direction guard measures updates "
           "against the server's own update on them instead of the round's median (0 = off: the round's median; "
           "a training split smaller than the default is used whole); in simulation a seeded draw from the "
           "training split", low=0),
)  # fmt: skip
