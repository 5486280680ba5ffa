"""The policy table: one record per routing policy, the single source of every policy fact.

``POLICY_TABLE`` maps a policy name to its :class:`Policy`: its solvers for token frames
(``route``) and image frames (``route_frames``), which router parameters it reads, whether it
uses the static subcarrier plan, whether it sees the channel, whether it certifies an
optimum and where it runs.  Config validation, the evaluation grid, the ``--help`` texts and
docs/method.md's policy table all read it; :func:`register_policy` adds a user's own policy,
which then routes through ``route`` and :class:`~dmoe_torch.moe.MoELayer` like a built-in
one (examples/custom_policy.py).

A token solver is ``solver(scores, costs, args) -> Selection``:

    scores  [B, K]    float64  gate probabilities (rows sum to 1), on the model's device
    costs   [B, K, N] float64  link energies [J], +inf = outage, on the same device
    args    :class:`RouteArgs` the validated router parameters (k_max resolved)

and returns a :class:`~dmoe_torch.selection.common.Selection` on that device.  A frame
solver is ``solver(scores [F, T, K], costs [F, K, N], capacity [F, K, N], args)`` on
float64 / int64 numpy arrays and returns a ``FrameSelection``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import Selection

__all__ = [
    "Policy",
    "RouteArgs",
    "POLICY_TABLE",
    "PARAMETERS",
    "register_policy",
    "get_policy",
    "policy_names",
    "policy_table_markdown",
]

# The router parameters a policy may read (RouterSpec / route() keyword arguments).
PARAMETERS = ("k", "gamma", "k_min", "k_max", "lam", "failure_energy", "generator")
# Where a policy's subcarriers come from: the static plan a(k) = k mod N (needs N >= K), a
# joint choice per input, or none at all (no transmission).
SUBCARRIER_PLANS = ("static", "joint", "none")


@dataclass(frozen=True)
class RouteArgs:
    """The validated router parameters a solver receives.

    gamma            relevance target in (0, 1]
    k                experts per input of the fixed-k policies
    k_min, k_max     cardinality bounds (k_max resolved: never None)
    lam              Lagrange multiplier [1/J] of the lagrangian policy (None: not set)
    failure_energy   J spent per failed attempt of a channel-unaware policy (P_ap T_max)
    generator        CPU torch.Generator of random policies (None: torch's global one)
    price_rounds, rescue_rounds, reassign_rounds   options of the image-frame jesa solver (``frame_jesa``)
    """

    gamma: float = 1.0
    k: int = 2
    k_min: int = 1
    k_max: int = 1
    lam: float | None = None
    failure_energy: float = 0.0
    generator: torch.Generator | None = None
    price_rounds: int = 0
    rescue_rounds: int = 0
    reassign_rounds: int = 0


TokenSolver = Callable[[torch.Tensor, torch.Tensor, RouteArgs], Selection]


@dataclass(frozen=True)
class Policy:
    """One routing policy.

    name           the config name (router.policy, eval.policies)
    summary        one line for help texts and the docs' table
    token_solver   solver under token frames (None: image frames only)
    frame_solver   solver under image frames (None: token frames only)
    params         the parameters it reads, a subset of :data:`PARAMETERS`
    subcarriers    "static" (a(k) = k mod N, needs N >= K), "joint" or "none"
    channel_aware  whether its choice depends on the link costs
    certifies      whether it solves an optimisation problem and reports proven optima
                   (``Selection.certified``)
    devices        where it runs, in words (docs only)
    """

    name: str
    summary: str
    token_solver: TokenSolver | None = None
    frame_solver: Callable | None = None
    params: tuple[str, ...] = ()
    subcarriers: str = "static"
    channel_aware: bool = False
    certifies: bool = False
    devices: str = "any"
    builtin: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"policy name must be an identifier-like string, got {self.name!r}")
        if self.token_solver is None and self.frame_solver is None:
            raise ValueError(f"policy {self.name!r} needs a token_solver or a frame_solver")
        unknown = [p for p in self.params if p not in PARAMETERS]
        if unknown:
            raise ValueError(f"policy {self.name!r}: unknown parameter(s) {unknown}; allowed: {', '.join(PARAMETERS)}")
        if "k" in self.params and ("gamma" in self.params or "lam" in self.params):
            raise ValueError(f"policy {self.name!r} takes either k or a target (gamma / lam) with k_min / k_max, not both")
        if self.subcarriers not in SUBCARRIER_PLANS:
            raise ValueError(
                f"policy {self.name!r}: subcarriers must be one of {', '.join(SUBCARRIER_PLANS)}, got {self.subcarriers!r}"
            )

    @property
    def fixed_k(self) -> bool:
        """Its cardinality is router.k (topk-like); otherwise k_min / k_max bound it, if anything."""
        return "k" in self.params

    @property
    def bounded(self) -> bool:
        """It reads the cardinality bounds k_min / k_max (a target-driven policy)."""
        return "k_min" in self.params

    @property
    def static_plan(self) -> bool:
        return self.subcarriers == "static"

    @property
    def plans_for_outage(self) -> bool:
        """Under imperfect CSI it plans on costs for router.outage_target: the policies that
        optimise over the channel (a target-driven, channel-aware policy)."""
        return self.channel_aware and self.bounded


# name -> Policy; its keys are the allowed policy names.  Filled by builtin.py (imported by
# the package) and by register_policy.
POLICY_TABLE: dict[str, Policy] = {}


def register_policy(
    name: str,
    *,
    summary: str,
    token_solver: TokenSolver | None = None,
    frame_solver: Callable | None = None,
    params: tuple[str, ...] = (),
    subcarriers: str = "joint",
    channel_aware: bool = True,
    certifies: bool = False,
    devices: str = "any",
    replace: bool = False,
    _builtin: bool = False,
) -> Policy:
    """Add a routing policy to :data:`POLICY_TABLE`; returns its record.

    After this, ``route(name, ...)``, ``RouterSpec(policy=name)``, ``router.policy=name`` in a
    config (when the module registering it is imported) and evaluation grids accept it.
    Arguments as the fields of :class:`Policy`; replace=True overwrites an existing user
    policy (built-in ones cannot be replaced).  Raises ValueError on a bad record or a taken
    name.
    """
    existing = POLICY_TABLE.get(name)
    if existing is not None and (existing.builtin or not replace):
        raise ValueError(f"policy {name!r} is already registered" + ("" if existing.builtin else " (replace=True overwrites it)"))
    policy = Policy(
        name=name,
        summary=summary,
        token_solver=token_solver,
        frame_solver=frame_solver,
        params=tuple(params),
        subcarriers=subcarriers,
        channel_aware=channel_aware,
        certifies=certifies,
        devices=devices,
        builtin=_builtin,
    )
    POLICY_TABLE[name] = policy
    return policy


def policy_names(frame: str | None = None) -> tuple[str, ...]:
    """The registered names: all (frame None), those with a token solver ("token") or those
    with a frame solver ("image"), in registration order."""
    if frame is None:
        return tuple(POLICY_TABLE)
    if frame == "token":
        return tuple(n for n, p in POLICY_TABLE.items() if p.token_solver is not None)
    if frame == "image":
        return tuple(n for n, p in POLICY_TABLE.items() if p.frame_solver is not None)
    raise ValueError(f"frame must be 'token', 'image' or None, got {frame!r}")


def get_policy(name, *, key: str = "policy", frame: str | None = None) -> Policy:
    """The record of policy ``name``; ValueError naming ``key`` and the allowed names
    otherwise (for ``frame`` "token" / "image": the names available under that frame)."""
    policy = POLICY_TABLE.get(name) if isinstance(name, str) else None
    if policy is None:
        raise ValueError(f"{key} must be one of {', '.join(policy_names(frame))}; got {name!r}")
    if frame == "token" and policy.token_solver is None:
        raise ValueError(
            f"{key}={name!r} exists only for image frames (channel.frame=image); with token frames "
            f"use one of {', '.join(policy_names('token'))}"
        )
    if frame == "image" and policy.frame_solver is None:
        raise ValueError(
            f"{key}={name!r} is not available with image frames (channel.frame=image); one of {', '.join(policy_names('image'))}"
        )
    return policy


def policy_table_markdown() -> str:
    """docs/method.md's policy table, made from :data:`POLICY_TABLE` (a test keeps them equal)."""
    lines = [
        "| policy | what it does | parameters | subcarriers | channel-aware | certifies | frames | runs on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in POLICY_TABLE.values():
        frames = "/".join(f for f, s in (("token", p.token_solver), ("image", p.frame_solver)) if s is not None)
        params = ", ".join(x for x in p.params if x not in ("failure_energy", "generator")) or "-"
        lines.append(
            f"| `{p.name}` | {p.summary} | {params} | {p.subcarriers} | {'yes' if p.channel_aware else 'no'} | "
            f"{'yes' if p.certifies else 'no'} | {frames} | {p.devices} |"
        )
    return "\n".join(lines)
