"""The Mixture-of-Experts layer of the DMoE protocol: gate, routing, dispatch, combine.

Per input (one frame) and layer (docs/method.md, section 1):

1. the gate scores the hidden state: ``s = softmax(gate(h))`` over the K experts;
2. a routing policy (:func:`dmoe_torch.selection.route`) picks the experts and their
   subcarriers from the scores and the channel costs, without gradients;
3. the selected experts whose links are not in outage run on the input (each expert only on
   the rows routed to it: gather, run, scale, index-add);
4. combine: ``h <- h + sum_{k in S'} w_k f_k(h)`` over the effective set
   ``S' = selected and not failed``, with ``w`` set by ``combine`` (:data:`COMBINE_RULES`):
   ``renormalized`` ``w_k = s_k / sum_{j in S'} s_j`` (Mixtral), ``raw`` ``w_k = s_k``
   (Switch / V-MoE), ``renormalized_st`` the renormalized value with the raw rule's gradient
   added (docs/method.md, "Combine rules").  Gradients reach the gate through ``w``.
   A row with no effective expert (dropped, or every selected link failed) passes ``h``
   through unchanged.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from .selection import Selection, route
from .selection.common import check_bounds, check_gamma, is_int, is_real
from .selection.delivery import apply_delivery
from .selection.frame import FrameLinks, token_selection
from .selection.policies import get_policy
from .selection.registry import check_lam, route_frames
from .utils import ConfigError

__all__ = [
    "RouterSpec",
    "FrameLinks",
    "Expert",
    "MoELayer",
    "MoEOutput",
    "METRIC_WEIGHTS",
    "MetricAverager",
    "load_balancing_loss",
    "router_z_loss",
    "balance_mask",
    "COMBINE_RULES",
    "BALANCE_ON",
    "perfect_costs",
    "drop_links",
]


def check_positive_int(key: str, value) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is an int >= 1 (bools rejected)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{key} must be an int >= 1, got {value!r}")


# Combine rules of MoELayer (model.combine); runs recorded before the key existed used the
# first (config/migration.py).
#   renormalized     w_k = s_k / sum_{j in S'} s_j: a row with one effective expert has w = 1
#                    and sends the gate no task gradient
#   raw              w_k = s_k of the full softmax (Switch, V-MoE): sum_k w_k <= 1
#   renormalized_st  the renormalized value plus s_k - stopgrad(s_k): same forward values,
#                    gradient = renormalized's + raw's, so single-expert rows reach the gate
COMBINE_RULES = ("renormalized", "raw", "renormalized_st")
# train.precision: the autocast dtype of the forward passes (None: plain float32).  The MoE
# layer keeps its gate, softmax and combine weights in float32 under autocast.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# What the load-balancing loss counts as routed (model.balance_on); the first is the default.
#   selection  the policy's selection (channel-influenced; failed links included)
#   scores     the score-only top-k mask (k = router.k; 2 for des / jesa / optimal)
BALANCE_ON = ("selection", "scores")
# Policies without a fixed k: balance_on=scores counts their top-2 (the expert budget of topk@2).
BALANCE_K_OF_TARGET_POLICIES = 2


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def check_link_dropout(value) -> float:
    """``value`` as a float; ConfigError (a ValueError) naming model.link_dropout unless it is
    a probability in [0, 1).  The one rule of the key: the model config and the layer call it."""
    if not is_real(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"model.link_dropout={value!r}: must be a probability in [0, 1)")
    return float(value)


@dataclass
class RouterSpec:
    """How one MoE layer routes.

    policy          a name of the policy table (``dmoe_torch.selection.policy_names()``)
    gamma           relevance target (importance factor) in (0, 1] of the target-driven policies
    k               number of experts of the fixed-k policies (topk, channel_topk, random_topk)
    k_min, k_max    cardinality bounds of the target-driven policies (k_max None: K)
    lam             Lagrange multiplier [1/J] of the lagrangian policy (None: unset)
    failure_energy  joules counted per failed attempt of a channel-unaware policy (P_ap * T_max)
    outage_target   channel-optimising policies plan for this per-link outage probability (None: trust the estimate)

    Raises ValueError naming the ``router.*`` key on a bad value.
    """

    policy: str
    gamma: float = 1.0
    k: int = 2
    k_min: int = 1
    k_max: int | None = None
    lam: float | None = None
    failure_energy: float = 0.0
    outage_target: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str):
            raise ValueError(f"router.policy must be a policy name (str), got {type(self.policy).__name__}")
        entry = get_policy(self.policy, key="router.policy")
        check_gamma(self.gamma, "router.gamma")
        check_positive_int("router.k", self.k)
        # K is not known here (the layer checks k_max <= K): no upper bound
        check_bounds(self.k_min, self.k_min if self.k_max is None else self.k_max, sys.maxsize, prefix="router.")
        if "lam" in entry.params or self.lam is not None:
            check_lam(self.lam, "router.lam")
        fe = self.failure_energy
        if not is_real(fe) or not (math.isfinite(fe) and fe >= 0):
            raise ValueError(f"router.failure_energy must be a finite float >= 0 (joules), got {fe!r}")
        q = self.outage_target
        if q is not None and (not is_real(q) or not 0.0 < q < 1.0):
            raise ValueError(f"router.outage_target must be null or a probability in (0, 1), got {q!r}")

    @property
    def planning_target(self) -> float | None:
        """The outage target the channel plans this policy's costs with: only the policies
        that optimise over the channel (``Policy.plans_for_outage``) plan conservatively; the
        others see the plain estimate."""
        return self.outage_target if get_policy(self.policy).plans_for_outage else None

    def route_kwargs(self) -> dict:
        """The keyword arguments of ``route`` / ``route_frames`` this spec sets."""
        return dict(
            gamma=self.gamma, k=self.k, k_min=self.k_min, k_max=self.k_max, lam=self.lam, failure_energy=self.failure_energy
        )


class Expert(nn.Module):
    """Pre-LayerNorm MLP: ``x -> W2 gelu(W1 LN(x))``, d -> hidden_mult * d -> d.

    The residual is added by the MoE layer, so ``forward`` returns ``f(x)`` only.
    x: [rows, d] -> [rows, d].
    """

    def __init__(self, d_model: int, hidden_mult: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, hidden_mult * d_model)
        self.fc2 = nn.Linear(hidden_mult * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


@dataclass
class MoEOutput:
    """Result of :meth:`MoELayer.forward`.

    out        [B, d]  h + sum_k w_k f_k(h)
    aux_loss   scalar  Switch-style load-balancing loss (1.0 = perfect balance), differentiable
    metrics    dict of detached CPU tensors, per-batch means (see :data:`METRIC_WEIGHTS`)
    selection  the policy's :class:`Selection` (CPU)
    z_loss     scalar  router z-loss mean_b logsumexp(logits_b)^2 (:func:`router_z_loss`), differentiable
    energy_loss scalar expected link cost under the gate (:func:`expected_link_cost`), differentiable;
               None unless the layer has the channel-aware gate
    """

    out: torch.Tensor
    aux_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    selection: Selection
    z_loss: torch.Tensor | None = None
    energy_loss: torch.Tensor | None = None


# Every metric of MoELayer is a per-batch mean; this is the batch quantity it is a mean over,
# i.e. the weight to average it over batches with (see MetricAverager):
#   count           inputs in the batch
#   selected_links  selected (expert, input) links in the batch (failed ones included)
METRIC_WEIGHTS = {
    "energy_j": "count",  # mean energy per input spent by this layer, J
    "experts_per_input": "count",  # mean number of effective experts (selected, not failed)
    "outage_rate": "selected_links",  # selected links the channel failed / selected links
    "link_dropout_rate": "selected_links",  # selected links dropped by training-time link dropout / selected links
    "violation_rate": "count",  # share of inputs whose relevance target was not reachable
    "drop_rate": "count",  # share of inputs with no effective expert (passed through)
    "certified_rate": "count",  # share of inputs whose selection is proven optimal
    "nodes": "count",  # mean branch-and-bound nodes per input
    "gate_entropy": "count",  # mean entropy of the gate's softmax, nats
    "utilisation": "count",  # [K] share of inputs each expert effectively served
    "single_expert_rate": "count",  # share of inputs with exactly one effective expert
    "frame_overrun_rate": "count",  # share of inputs whose frame missed T_max (Selection.frame_overrun)
}
# Computed by MetricAverager.compute() from the utilisation over everything it saw (not
# per-batch means: an expert is dead only if no batch of the epoch selected it):
#   load_max_over_mean  max_k u_k / mean_k u_k (1 = balanced, K = one expert serves all)
#   load_cv             std_k u_k / mean_k u_k, population std (0 = balanced)
#   dead_experts        experts that served no input at all
LOAD_METRICS = ("load_max_over_mean", "load_cv", "dead_experts")


class MetricAverager:
    """Averages MoE metrics over batches, weighting each batch's means correctly.

    ``update(metrics)`` with a metrics dict of :class:`MoEOutput`; ``compute()`` returns
    ``{name: float}`` (``utilisation`` as a list of floats), equal to the metric over all the
    inputs seen, e.g. outage_rate = all failed links / all selected links, plus the
    :data:`LOAD_METRICS` of that utilisation.  A metric that some dicts lack (written by an
    older version, e.g. in a mid-epoch checkpoint) is averaged over the batches that have it.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._metric_weights: dict[str, torch.Tensor] = {}  # name -> summed weight of the batches that had it
        self._weights: dict[str, torch.Tensor | float] = {"count": 0.0, "selected_links": 0.0}

    def update(self, metrics: dict[str, torch.Tensor]) -> None:
        """Add one batch's metrics; tensors stay where they are (no host sync until compute)."""
        for name, weight_name in METRIC_WEIGHTS.items():
            if name not in metrics:
                continue
            weight = metrics[weight_name].detach().to(torch.float64)
            value = metrics[name].detach().to(torch.float64) * weight
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._metric_weights[name] = self._metric_weights[name] + weight if name in self._metric_weights else weight
        for weight_name in self._weights:
            self._weights[weight_name] = self._weights[weight_name] + metrics[weight_name].detach().to(torch.float64)

    def compute(self) -> dict[str, float | list[float]]:
        """The means over every batch seen, read to the host once."""
        result: dict[str, float | list[float]] = {}
        for name, total in self._sums.items():
            weight = float(self._metric_weights[name])
            mean = total.cpu() / weight if weight > 0 else torch.zeros_like(total, device="cpu")
            result[name] = mean.tolist() if mean.dim() else float(mean)
        result.update({name: float(value) for name, value in self._weights.items()})
        if "utilisation" in self._sums:  # summed count x share = inputs each expert served
            result.update(load_metrics(self._sums["utilisation"].cpu()))
        return result


def load_metrics(load: torch.Tensor) -> dict[str, float]:
    """:data:`LOAD_METRICS` of a per-expert load [K] (any scale: shares or counts).
    No load at all gives max/mean 0, cv 0 and every expert dead."""
    load = load.to(torch.float64)
    mean = float(load.mean())
    dead = float((load == 0).sum())
    if mean <= 0:
        return {"load_max_over_mean": 0.0, "load_cv": 0.0, "dead_experts": dead}
    std = float(load.std(correction=0))
    return {"load_max_over_mean": float(load.max()) / mean, "load_cv": std / mean, "dead_experts": dead}


def load_balancing_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-style load-balancing loss over the full softmax.

        loss = K * sum_k f_k * P_k,
        P_k  = mean over the batch of s_k                       (differentiable)
        f_k  = (inputs routed to k) / (total routed slots)      (from the mask)

    Both f and P sum to 1, so perfectly balanced routing (f_k = P_k = 1/K) gives exactly 1.0;
    concentrating load and probability on fewer experts raises it (at most K).  A batch with
    no routed slot gives 0.  With k slots per row this is 1/k of Hugging Face's
    ``load_balancing_loss_func`` (which divides by tokens, balanced = k): ours x k = theirs.
    scores [B, K] (rows sum to 1); mask [B, K] bool (routing decision, failed links included:
    they were routed; see :func:`balance_mask`).  Returns a scalar on scores' device.
    """
    K = scores.shape[1]
    slots = mask.to(scores.dtype)
    total = slots.sum()
    load = slots.sum(0) / total.clamp_min(1.0)
    importance = scores.mean(0)
    return K * (load.detach() * importance).sum()


def balance_mask(balance_on: str, selection: Selection, scores: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The mask the load-balancing loss counts as routed, [B, K] bool on scores' device.

    ``selection``: the policy's selection mask (channel-influenced, failed links included);
    ``scores``: the k highest scores of each row, k = spec.k for the
    fixed-k policies and 2 for des / jesa / optimal, at most K: what the gate alone would
    route, so the loss does not push probability toward the experts the channel favours.
    """
    if balance_on == "selection":
        return selection.mask
    k = spec.k if get_policy(spec.policy).fixed_k else BALANCE_K_OF_TARGET_POLICIES
    k = min(k, scores.shape[1])
    top = scores.detach().topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


# An expert with no finite link is fed to the channel-aware gate as this many times costlier
# (in log units: + log(10)) than the row's costliest reachable one.
UNREACHABLE_COST_FACTOR = 10.0


def _finite_link_costs(best_link: torch.Tensor) -> torch.Tensor:
    """best_link [B, K] J with +inf replaced by UNREACHABLE_COST_FACTOR x the row's largest
    finite cost (1 J where no expert of the row is reachable)."""
    finite = torch.isfinite(best_link)
    worst = best_link.masked_fill(~finite, 0.0).amax(1, keepdim=True)
    worst = torch.where(finite.any(1, keepdim=True), worst, torch.ones_like(worst))
    return torch.where(finite, best_link, UNREACHABLE_COST_FACTOR * worst)


def link_features(best_link: torch.Tensor) -> torch.Tensor:
    """The channel-aware gate's input [B, K]: the log of each expert's cheapest planned link
    energy, centred over the row's experts (unit-free: only the relative price of the experts
    of one input matters).  best_link [B, K] J, +inf = unreachable."""
    log_cost = _finite_link_costs(best_link).clamp_min(1e-30).log()
    return log_cost - log_cost.mean(1, keepdim=True)


def expected_link_cost(scores: torch.Tensor, best_link: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k s_bk c_bk / mean_k c_bk: the expected cost of one link drawn from the
    gate's probabilities, in units of the row's mean link cost (1 = channel-blind uniform
    gate; min_k c / mean_k c = all mass on the cheapest expert).  scores [B, K];
    best_link [B, K] J (+inf: see :func:`_finite_link_costs`).  Scalar, differentiable in
    scores; 0 for an empty batch."""
    if scores.shape[0] == 0:
        return scores.sum()
    cost = _finite_link_costs(best_link).to(scores.dtype)
    relative = cost / cost.mean(1, keepdim=True)
    return (scores * relative).sum(1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over rows of logsumexp(logits)^2.  logits [B, K] (float32
    or wider); scalar, 0 for an empty batch.  Keeps the gate's logits small, which fp16 / bf16
    softmaxes need (train.z_loss_coef; ST-MoE uses 1e-3)."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def combine_weights(logits: torch.Tensor, scores: torch.Tensor, effective: torch.Tensor, combine: str) -> torch.Tensor:
    """Combine weights w [B, K] (0 outside the effective set) of one MoE layer.

    logits, scores [B, K] (scores = softmax(logits)); effective [B, K] bool.
    renormalized: w_k = s_k / sum_{j in S'} s_j, computed as a softmax over the effective
    logits (the same value, but no 0/0 when every effective score underflows); rows without
    an effective expert get constant logits (no gradient, no NaN) and weight 0.
    raw: w_k = s_k.  renormalized_st: renormalized + (s_k - stopgrad(s_k)) on S'.
    """
    if combine == "raw":
        return scores * effective
    has_expert = effective.any(dim=1, keepdim=True)
    masked_logits = logits.masked_fill(~effective, -math.inf)
    masked_logits = torch.where(has_expert, masked_logits, torch.zeros_like(logits))
    weights = torch.softmax(masked_logits, dim=-1) * effective
    if combine == "renormalized_st":
        weights = weights + (scores - scores.detach()) * effective
    return weights


def drop_links(selection: Selection, scores: torch.Tensor, p: float, generator: torch.Generator | None) -> Selection:
    """Training-time link dropout: each effective (selected, not failed) link of a row fails
    with probability ``p``, except that a row never loses its last effective link this way
    (if every one of them is drawn, the one with the highest gate score stays).

    The model thus learns to classify with fewer experts than it was routed to (what cheap
    des / jesa selections and outages give it at test time) without learning to do without
    experts altogether.  Dropped links are marked ``failed``; energy and the other fields are
    unchanged.  scores [B, K] on the selection's device; draws one uniform per (row, expert)
    from ``generator`` (a CPU generator: the same draws on every device).
    """
    effective = selection.mask & ~selection.failed
    uniforms = torch.rand(effective.shape, generator=generator).to(effective.device, non_blocking=True)
    drop = effective & (uniforms < p)
    lost_all = effective.any(1) & ~(effective & ~drop).any(1)
    # A row that drew all its links keeps its best-scored one (no data-dependent branch: the
    # mask is all-False on the other rows).
    best = scores.masked_fill(~effective, -math.inf).argmax(1, keepdim=True)
    keep = torch.zeros_like(drop).scatter_(1, best, True) & lost_all.unsqueeze(1)
    return replace(selection, failed=selection.failed | (drop & ~keep))


def perfect_costs(batch: int, num_experts: int, num_subcarriers: int) -> torch.Tensor:
    """An ideal channel: every link reachable at zero energy.  float64 CPU [B, K, N]."""
    return torch.zeros(batch, num_experts, num_subcarriers, dtype=torch.float64)


class MoELayer(nn.Module):
    """A residual MoE layer whose experts sit on K edge devices.

    d_model      width of h
    num_experts  K
    hidden_mult  expert hidden width = hidden_mult * d_model
    link_dropout in training mode only, like nn.Dropout: probability that each effective link
                 is dropped after routing, never a row's last one (:func:`drop_links`)
    combine      combine rule, one of :data:`COMBINE_RULES` (default: renormalized, what
                 runs recorded before the key mean)
    balance_on   what the load-balancing loss counts, one of :data:`BALANCE_ON`
    channel_gate the learned channel-aware gate: the gate also sees each expert's link cost
                 (:func:`link_features`) through ``link_gate`` (K -> K, zero at init, so it
                 starts as the plain gate), and the layer reports ``energy_loss``, the
                 expected link cost under the gate's probabilities (:func:`expected_link_cost`),
                 which training weighs with train.energy_loss_coef
    The gate is ``nn.Linear(d_model, K)`` producing logits; the softmax is taken in forward.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        hidden_mult: int = 2,
        link_dropout: float = 0.0,
        combine: str = "renormalized",
        balance_on: str = "selection",
        channel_gate: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("model.d_model", d_model), ("model.num_experts", num_experts), ("model.hidden_mult", hidden_mult)):
            check_positive_int(key, value)
        check_link_dropout(link_dropout)
        check_choice("model.combine", combine, COMBINE_RULES)
        check_choice("model.balance_on", balance_on, BALANCE_ON)
        self.link_dropout = float(link_dropout)
        self.combine = combine
        self.balance_on = balance_on
        self.d_model = d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts)
        if not isinstance(channel_gate, bool):
            raise ValueError(f"model.channel_gate must be true or false, got {channel_gate!r}")
        self.link_gate = nn.Linear(num_experts, num_experts) if channel_gate else None
        if self.link_gate is not None:
            nn.init.zeros_(self.link_gate.weight)
            nn.init.zeros_(self.link_gate.bias)
        self.experts = nn.ModuleList(Expert(d_model, hidden_mult) for _ in range(num_experts))

    def forward(
        self,
        h: torch.Tensor,
        costs: torch.Tensor,
        spec: RouterSpec,
        generator: torch.Generator | None = None,
        delivered: torch.Tensor | None = None,
    ) -> MoEOutput:
        """h [B, d]; costs [B, K, N] float64 J (+inf = outage), CPU, as the router sees them
        (planned from its channel estimate), one frame per row; or :class:`FrameLinks` of F
        image frames whose T = B / F tokens share a frame (rows f * T + t), routed by
        ``route_frames`` (P3); spec: routing config; generator: CPU torch.Generator for
        random policies; delivered: None (perfect CSI: every finite link carries its planned
        rate) or bool [B, K, N], whether the true channel carries link (k, n)'s planned rate
        within T_max; a selected link that does not is a failure (token frames only)."""
        if isinstance(spec, str):  # a bare policy name: its defaults
            spec = RouterSpec(spec)
        if not isinstance(spec, RouterSpec):
            raise ValueError(f"spec must be a RouterSpec or a policy name, got {type(spec).__name__}")
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.d_model:
            raise ValueError(f"h must be a tensor [B, {self.d_model}], got {tuple(getattr(h, 'shape', ())) or type(h).__name__}")
        weight_dtype = self.gate.weight.dtype
        if h.dtype != weight_dtype and not torch.is_autocast_enabled(h.device.type):
            raise ValueError(
                f"h has dtype {h.dtype} but the layer's parameters are {weight_dtype}: convert one to "
                f"the other (layer.to({h.dtype}) or h.to({weight_dtype})), or run under torch.autocast"
            )
        B, K = h.shape[0], self.num_experts
        if not isinstance(costs, (torch.Tensor, FrameLinks)):
            raise ValueError(f"costs must be a tensor [B, K, N] or FrameLinks, got {type(costs).__name__}")
        frames = costs if isinstance(costs, FrameLinks) else None
        if frames is not None:
            F = frames.costs.shape[0]
            if frames.costs.shape[1] != K or F == 0 or B % F:
                raise ValueError(
                    f"FrameLinks must be [F, K={K}, N] with F dividing the {B} rows, got {tuple(frames.costs.shape)}"
                )
            if delivered is not None:
                raise ValueError("image frames (FrameLinks) plan on the true channel: delivered must be None")
        elif costs.dim() != 3 or costs.shape[0] != B or costs.shape[1] != K:
            raise ValueError(f"costs must be [B={B}, K={K}, N], got {tuple(costs.shape)}")

        best_link = None
        if self.link_gate is not None:  # each row's cheapest planned link per expert, [B, K] J
            link_costs = costs.costs.repeat_interleave(B // F, 0) if frames is not None else costs
            best_link = link_costs.to(h.device, torch.float32, non_blocking=True).amin(2)
        logits, scores = self.gate_scores(h, best_link)
        with torch.no_grad():
            selection = self.select(scores.detach(), costs, spec, generator, delivered)
            channel_failed = selection.failed
            if self.training and self.link_dropout > 0:
                selection = drop_links(selection, scores.detach(), self.link_dropout, generator)
        effective = selection.mask & ~selection.failed
        weights = combine_weights(logits, scores, effective, self.combine)
        out = self.dispatch_and_combine(h, effective, weights)
        aux_loss = load_balancing_loss(scores, balance_mask(self.balance_on, selection, scores, spec))
        metrics = self._metrics(scores.detach(), selection, effective, channel_failed)
        energy_loss = expected_link_cost(scores, best_link) if best_link is not None else None
        return MoEOutput(
            out=out,
            aux_loss=aux_loss,
            metrics=metrics,
            selection=selection,
            z_loss=router_z_loss(logits),
            energy_loss=energy_loss,
        )

    def gate_scores(self, h: torch.Tensor, best_link: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's logits and softmax scores [B, K], float32 at least: under autocast the
        gate matmul itself runs in float32 (bf16 logits would round the scores the router
        compares and the combine weights).  best_link [B, K] J: the channel-aware gate's input."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(device_type=h.device.type, enabled=False):
            if self.gate.weight.dtype == dtype:  # the module call keeps forward hooks working
                logits = self.gate(h.to(dtype))
            else:  # half-precision parameters: the gate still multiplies in float32
                logits = nn.functional.linear(h.to(dtype), self.gate.weight.to(dtype), self.gate.bias.to(dtype))
            if self.link_gate is not None:
                features = link_features(best_link).to(dtype)
                logits = logits + nn.functional.linear(features, self.link_gate.weight.to(dtype), self.link_gate.bias.to(dtype))
        return logits, torch.softmax(logits, dim=-1)

    def select(
        self, scores: torch.Tensor, costs, spec: RouterSpec, generator: torch.Generator | None, delivered: torch.Tensor | None
    ) -> Selection:
        """The policy's Selection for scores [B, K] (on the model's device), routed on that device
        for token frames; image frames (``FrameLinks``) are solved on the CPU by numba (P3)."""
        B, K = scores.shape
        if isinstance(costs, FrameLinks):
            F = costs.costs.shape[0]
            plan = route_frames(spec.policy, scores.cpu().view(F, B // F, K), costs.costs, costs.capacity, **spec.route_kwargs())
            return token_selection(plan).to(scores.device)
        # check_values=False: the scores are this layer's own softmax and the costs come from the
        # channel; checking their values would wait for an accelerator.
        selection = route(spec.policy, scores, costs, generator=generator, check_values=False, **spec.route_kwargs())
        if delivered is not None:
            selection = apply_delivery(selection, costs, delivered, spec.failure_energy)
        return selection

    def dispatch_and_combine(self, h: torch.Tensor, effective: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """h + sum_k w_k f_k(h): gather the routed rows once, grouped by expert (expert-major,
        rows ascending), run each expert on its own group only, scale by w and index-add back.
        h [B, d]; effective [B, K] bool; weights [B, K]."""
        # The layer's one host sync: the group sizes, which the per-expert GEMMs (and a remote
        # runtime's messages) need on the host.  nonzero_static then needs no second one.
        counts = effective.sum(0).tolist()
        routed_count = sum(counts)
        if not routed_count:
            return h
        routed = torch.nonzero_static(effective.t(), size=routed_count)  # [M, 2] (expert, row)
        experts_of_slot, rows = routed[:, 0], routed[:, 1]
        groups = h.index_select(0, rows).split(counts)
        expert_out = torch.cat(self.run_experts(counts, groups))
        slot_weights = weights[rows, experts_of_slot].unsqueeze(1).to(expert_out.dtype)
        weighted = (expert_out * slot_weights).to(h.dtype)
        if torch.are_deterministic_algorithms_enabled():
            # index_add accumulates a row's experts with atomics on CUDA, in no fixed order; each
            # (row, expert) pair is unique, so writing the slots into [B, K, d] and summing over
            # K gives the same sum in a fixed order (K x the memory of h).
            slots = h.new_zeros(h.shape[0], effective.shape[1], h.shape[1])
            slots[rows, experts_of_slot] = weighted
            return h + slots.sum(1)
        return h.index_add(0, rows, weighted)

    def run_experts(self, counts: list[int], groups: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Run expert k on ``groups[k]`` ([counts[k], d], the rows routed to k); return the
        outputs of the non-empty groups in expert order.  A runtime (``dmoe_torch.runtime``)
        replaces this per layer, as an instance attribute, to run the experts elsewhere."""
        return [self.experts[k](group) for k, group in enumerate(groups) if counts[k]]

    @staticmethod
    def _metrics(
        scores: torch.Tensor, selection: Selection, effective: torch.Tensor, channel_failed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-batch means (see METRIC_WEIGHTS) as detached float64 tensors on the layer's device
        (read on the host only when logged).  channel_failed [B, K]: the links the channel
        failed, before training-time link dropout (counted apart, as link_dropout_rate)."""
        B = effective.shape[0]
        inputs = max(B, 1)
        f64 = torch.float64
        selected_links = selection.mask.sum().to(f64)
        s = scores.to(f64)
        entropy = -torch.special.xlogy(s, s).sum(1)
        return {
            "count": torch.full((), float(B), dtype=f64, device=s.device),  # a fill, not a host copy (a sync)
            "selected_links": selected_links,
            "energy_j": selection.energy.to(f64).sum() / inputs,
            "experts_per_input": effective.sum().to(f64) / inputs,
            "outage_rate": channel_failed.sum().to(f64) / selected_links.clamp_min(1.0),
            "link_dropout_rate": (selection.failed & ~channel_failed).sum().to(f64) / selected_links.clamp_min(1.0),
            "violation_rate": selection.violation.sum().to(f64) / inputs,
            "drop_rate": (~effective.any(1)).sum().to(f64) / inputs,
            "certified_rate": selection.certified.sum().to(f64) / inputs,
            "nodes": selection.nodes.sum().to(f64) / inputs,
            "gate_entropy": entropy.sum() / inputs,
            "utilisation": effective.sum(0).to(f64) / inputs,
            "single_expert_rate": (effective.sum(1) == 1).sum().to(f64) / inputs,
            "frame_overrun_rate": selection.frame_overrun.sum().to(f64) / inputs,
        }
