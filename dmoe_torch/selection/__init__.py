"""Expert (and subcarrier) selection policies: DES (P1), JESA (P2), baselines and one registry.

    from dmoe_torch.selection import des, jesa, route, POLICIES, Selection

``route(policy, scores, costs, ...)`` is the single entry point the MoE layer uses; the exact
references (brute force, MILP) live in ``dmoe_torch.selection.exact``.
"""

from .baselines import channel_topk, dense, random_topk, topk
from .common import RELEVANCE_TOL, Selection, empty_selection, validate_inputs
from .des import des
from .jesa import jesa
from .policies import POLICY_TABLE, Policy, RouteArgs, get_policy, policy_names, register_policy
from .registry import route, route_frames

# The built-in token-frame policies (policy_names("token") also lists registered ones).
POLICIES = policy_names("token")

__all__ = [
    "POLICIES",
    "POLICY_TABLE",
    "Policy",
    "RELEVANCE_TOL",
    "RouteArgs",
    "Selection",
    "channel_topk",
    "dense",
    "des",
    "empty_selection",
    "jesa",
    "get_policy",
    "policy_names",
    "random_topk",
    "register_policy",
    "route",
    "route_frames",
    "topk",
    "validate_inputs",
]
