"""Shared result type, input validation and result arrays (numpy <-> Selection) of every routing policy.

All policies are pure, batched functions: scores ``[B, K]`` and costs ``[B, K]`` (static
subcarriers) or ``[B, K, N]`` (per subcarrier) in, a :class:`Selection` out.  Costs are
energies in joules; ``+inf`` marks an unreachable expert / link in outage.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
import torch

# Relevance constraint tolerance: sum_k s_k x_k >= gamma - RELEVANCE_TOL.  Scores come from a
# float32 softmax whose rows sum to 1 only within ~1e-7, so gamma = 1 must stay reachable.
# Every solver (DES, JESA, brute force, MILP) uses this same constant.
RELEVANCE_TOL = 1e-6
# Rows of `scores` must sum to 1 within this tolerance.
SCORE_SUM_TOL = 1e-3


@dataclass
class Selection:
    """Routing decision for a batch of B inputs over K experts.

    mask        [B, K] bool    experts selected
    subcarrier  [B, K] int64   subcarrier of each selected expert, -1 where not selected
    energy      [B]    float64 joules spent by this layer's transmissions (failed attempts included)
    violation   [B]    bool    relevance target not reachable; the fallback (k_max reachable
                               experts with the highest scores) was used. True for dropped rows too.
    dropped     [B]    bool    no expert reachable: the layer passes the input through unchanged
    nodes       [B]    int64   branch-and-bound nodes explored (0 for policies without search)
    lower_bound [B]    float64 proven lower bound on the optimal energy (nan where not computed)
    certified   [B]    bool    the result is proven optimal for its problem (P1 for des, P2 for jesa)
    failed      [B, K] bool    selected links that were in outage (channel-unaware policies only):
                               their contribution is lost and P_ap * T_max is spent
    frame_overrun [B]  bool    the input's frame missed T_max: some device's planned or realised
                               hop time exceeded it (a failed link; under channel.frame=image the
                               frame's flag, repeated on each of its tokens).  None: failed.any(1)
    """

    mask: torch.Tensor
    subcarrier: torch.Tensor
    energy: torch.Tensor
    violation: torch.Tensor
    dropped: torch.Tensor
    nodes: torch.Tensor
    lower_bound: torch.Tensor
    certified: torch.Tensor
    failed: torch.Tensor
    frame_overrun: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.frame_overrun is None:
            self.frame_overrun = self.failed.any(1)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def to(self, device) -> Selection:
        return Selection(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def empty_selection(batch_size: int, num_experts: int, device: torch.device | str | None = None) -> Selection:
    """An all-False selection with zero energy on ``device`` (default CPU); policies fill it in."""
    B, K = batch_size, num_experts
    return Selection(
        mask=torch.zeros(B, K, dtype=torch.bool, device=device),
        subcarrier=torch.full((B, K), -1, dtype=torch.int64, device=device),
        energy=torch.zeros(B, dtype=torch.float64, device=device),
        violation=torch.zeros(B, dtype=torch.bool, device=device),
        dropped=torch.zeros(B, dtype=torch.bool, device=device),
        nodes=torch.zeros(B, dtype=torch.int64, device=device),
        lower_bound=torch.full((B,), math.nan, dtype=torch.float64, device=device),
        certified=torch.zeros(B, dtype=torch.bool, device=device),
        failed=torch.zeros(B, K, dtype=torch.bool, device=device),
    )


def is_real(value) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_gamma(gamma, key: str = "gamma") -> float:
    """gamma as a float; ValueError naming ``key`` unless it is a real number in (0, 1]."""
    if not is_real(gamma) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"{key} must be a float in (0, 1], got {gamma!r}")
    return float(gamma)


def check_bounds(k_min, k_max, num_experts: int, prefix: str = "") -> tuple[int, int]:
    """(k_min, k_max) as ints with k_max None -> K; ValueError naming the key unless
    1 <= k_min <= k_max <= K."""
    if k_max is None:
        k_max = num_experts
    for name, value in (("k_min", k_min), ("k_max", k_max)):
        if not is_int(value):
            raise ValueError(f"{prefix}{name} must be an int, got {value!r}")
    k_min, k_max = int(k_min), int(k_max)
    if k_min < 1:
        raise ValueError(f"{prefix}k_min must be >= 1, got {k_min}")
    if k_max < k_min:
        raise ValueError(f"{prefix}k_min ({k_min}) must be <= {prefix}k_max ({k_max})")
    if k_max > num_experts:
        raise ValueError(f"{prefix}k_max ({k_max}) must be <= the number of experts K ({num_experts})")
    return k_min, k_max


def validate_inputs(
    scores: torch.Tensor,
    costs: torch.Tensor,
    gamma: float,
    k_min: int,
    k_max: int | None,
    *,
    cost_ndim: int,
    keep_device: bool = False,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
    """Check a policy's inputs and return them as float64 tensors.

    scores: [B, K] relevance scores, rows sum to 1; costs: [B, K] (cost_ndim=2) or
    [B, K, N] (cost_ndim=3) energies in J, >= 0 or +inf.  Returns
    (scores64, costs64, gamma, k_min, k_max) with k_max resolved (None -> K), on the CPU, or
    with keep_device on scores' device (costs moved there).  check_values=False skips the
    checks of the tensors' values (NaN, signs, row sums), which on an accelerator would wait
    for the device: the MoE layer's own softmax and channel need none of them.
    Raises ValueError naming the bad argument.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [B, K], got {_describe(scores)}")
    if not isinstance(costs, torch.Tensor) or costs.dim() != cost_ndim:
        want = "[B, K]" if cost_ndim == 2 else "[B, K, N]"
        raise ValueError(f"costs must be a {cost_ndim}-D tensor {want}, got {_describe(costs)}")
    if costs.shape[:2] != scores.shape:
        raise ValueError(
            f"costs shape {tuple(costs.shape)} does not match scores shape {tuple(scores.shape)} "
            "in its first two dimensions [B, K]"
        )
    if not (scores.is_floating_point() and costs.is_floating_point()):
        raise ValueError(f"scores and costs must be float tensors, got {scores.dtype} and {costs.dtype}")
    B, K = scores.shape
    if K < 1:
        raise ValueError("scores must have at least one expert (K >= 1)")
    device = scores.device if keep_device else torch.device("cpu")
    s = scores.detach().to(device, torch.float64)
    c = costs.detach().to(device, torch.float64, non_blocking=True)
    if check_values:
        if not torch.isfinite(s).all():
            raise ValueError("scores contain NaN or inf; they must be finite probabilities")
        if (s < 0).any():
            raise ValueError("scores contain negative values; they must be probabilities in [0, 1]")
        if B and ((s.sum(1) - 1).abs() > SCORE_SUM_TOL).any():
            worst = (s.sum(1) - 1).abs().max().item()
            raise ValueError(f"scores rows must sum to 1 within {SCORE_SUM_TOL} (worst deviation {worst:.3g})")
        if torch.isnan(c).any():
            raise ValueError("costs contain NaN; use +inf for unreachable links")
        if (c < 0).any():
            raise ValueError("costs contain negative values; energies must be >= 0 (or +inf)")
    gamma = check_gamma(gamma)
    k_min, k_max = check_bounds(k_min, k_max, K)
    if cost_ndim == 3 and costs.shape[2] < k_min:
        raise ValueError(f"costs has N={costs.shape[2]} subcarriers, fewer than k_min={k_min}")
    return s, c, gamma, k_min, k_max


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def result_arrays(B: int, K: int):
    """Empty results of B rows and K experts: mask bool[B, K], energy float64[B], violation,
    dropped bool[B], nodes int64[B], bound float64[B] (nan)."""
    return (
        np.zeros((B, K), dtype=np.bool_),
        np.zeros(B),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B, dtype=np.int64),
        np.full(B, np.nan),
    )


def selection_from_arrays(mask, energy, violation, dropped, nodes, bound, *, subcarrier=None, certified=None) -> Selection:
    """A CPU Selection sharing the numpy arrays' memory: mask, subcarrier [B, K]; energy,
    violation, dropped, nodes, bound [B].  subcarrier None: all -1; certified None: the
    feasible rows (not violation).  No failed link (failed and frame_overrun all False)."""
    B, K = mask.shape
    if subcarrier is None:
        subcarrier = np.full((B, K), -1, dtype=np.int64)
    if certified is None:
        certified = ~violation
    return Selection(
        mask=torch.from_numpy(mask),
        subcarrier=torch.from_numpy(subcarrier),
        energy=torch.from_numpy(energy),
        violation=torch.from_numpy(violation),
        dropped=torch.from_numpy(dropped),
        nodes=torch.from_numpy(nodes),
        lower_bound=torch.from_numpy(bound),
        certified=torch.from_numpy(certified),
        failed=torch.from_numpy(np.zeros((B, K), dtype=np.bool_)),  # calloc: untouched pages cost nothing
        frame_overrun=torch.from_numpy(np.zeros(B, dtype=np.bool_)),
    )
