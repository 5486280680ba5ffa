"""Expert (and subcarrier) selection policies: DES (P1), JESA (P2), baselines and one registry.

    from dmoe_torch.selection import des, jesa, route, POLICIES, Selection

``route(policy, scores, costs, ...)`` is the single entry point the MoE layer uses; the exact
references (brute force, MILP) live in ``dmoe_torch.selection.exact``.
"""
from .baselines import channel_topk, dense, random_topk, topk
from .common import RELEVANCE_TOL, Selection, empty_selection, validate_inputs
from .des import des
from .jesa import jesa
from .registry import POLICIES, route

__all__ = [
    "POLICIES",
    "RELEVANCE_TOL",
    "Selection",
    "channel_topk",
    "dense",
    "des",
    "empty_selection",
    "jesa",
    "random_topk",
    "route",
    "topk",
    "validate_inputs",
]
