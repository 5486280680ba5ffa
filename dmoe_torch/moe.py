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
from dataclasses import dataclass, replace

import torch
from torch import nn

from .selection import POLICIES, Selection, route
from .selection.delivery import apply_delivery
from .selection.frame import token_selection
from .selection.registry import FRAME_ONLY_POLICIES, GAMMA_POLICIES, route_frames

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
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an int >= 1, got {value!r}")


# Combine rules of MoELayer (model.combine); the first is what an absent key means (runs
# recorded before the key existed).
#   renormalized     w_k = s_k / sum_{j in S'} s_j: a row with one effective expert has w = 1
#                    and sends the gate no task gradient
#   raw              w_k = s_k of the full softmax (Switch, V-MoE): sum_k w_k <= 1
#   renormalized_st  the renormalized value plus s_k - stopgrad(s_k): same forward values,
#                    gradient = renormalized's + raw's, so single-expert rows reach the gate
COMBINE_RULES = ("renormalized", "raw", "renormalized_st")
# What the load-balancing loss counts as routed (model.balance_on); the first is the default.
#   selection  the policy's selection (channel-influenced; failed links included)
#   scores     the score-only top-k mask (k = router.k; 2 for des / jesa / optimal)
BALANCE_ON = ("selection", "scores")
# Policies without a fixed k: balance_on=scores counts their top-2 (the expert budget of topk@2).
BALANCE_K_OF_GAMMA_POLICIES = 2


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def check_link_dropout(value) -> None:
    """Raise ValueError naming model.link_dropout unless ``value`` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"model.link_dropout must be a probability in [0, 1), got {value!r}")


@dataclass
class RouterSpec:
    """How one MoE layer routes.

    policy          one of ``dmoe_torch.selection.POLICIES``
    gamma           relevance target (importance factor) in (0, 1] of des / jesa / optimal
    k               number of experts of topk / channel_topk / random_topk
    k_min, k_max    cardinality bounds of des / jesa / optimal (k_max None: K)
    failure_energy  joules counted per failed attempt of a channel-unaware policy (P_ap * T_max)
    outage_target   des / jesa / optimal plan for this per-link outage probability (None: trust the estimate)

    Raises ValueError naming the ``router.*`` key on a bad value.
    """

    policy: str
    gamma: float = 1.0
    k: int = 2
    k_min: int = 1
    k_max: int | None = None
    failure_energy: float = 0.0
    outage_target: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES + FRAME_ONLY_POLICIES:
            raise ValueError(f"router.policy must be one of {', '.join(POLICIES + FRAME_ONLY_POLICIES)}; got {self.policy!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"router.gamma must be a float in (0, 1], got {self.gamma!r}")
        for key in ("k", "k_min"):
            check_positive_int(f"router.{key}", getattr(self, key))
        if self.k_max is not None and (
            isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < self.k_min
        ):
            raise ValueError(f"router.k_max must be null or an int >= router.k_min ({self.k_min}), got {self.k_max!r}")
        fe = self.failure_energy
        if isinstance(fe, bool) or not isinstance(fe, (int, float)) or not (math.isfinite(fe) and fe >= 0):
            raise ValueError(f"router.failure_energy must be a finite float >= 0 (joules), got {fe!r}")
        q = self.outage_target
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0):
            raise ValueError(f"router.outage_target must be null or a probability in (0, 1), got {q!r}")

    @property
    def planning_target(self) -> float | None:
        """The outage target the channel plans this policy's costs with: only the policies
        that optimise over the channel (des, jesa, optimal) plan conservatively; the others
        see the plain estimate."""
        return self.outage_target if self.policy in ("des", "jesa", "optimal") else None


@dataclass
class FrameLinks:
    """The links of image frames (channel.frame=image; docs/method.md section 11): one frame per
    (image, MoE layer), whose T tokens share its channel draw and its N subcarriers.

    costs     [F, K, N] float64 CPU  J per token on link (k, n), downlink + uplink (+inf = outage)
    capacity  [F, K, N] int64 CPU    whole tokens link (k, n) carries within T_max on both hops
    The MoE layer's rows are the F * T tokens, row f * T + t for token t of frame f.
    """

    costs: torch.Tensor
    capacity: torch.Tensor

    def __post_init__(self) -> None:
        if self.costs.dim() != 3 or self.capacity.shape != self.costs.shape:
            raise ValueError(f"FrameLinks: costs and capacity must both be [F, K, N], got "
                             f"{tuple(self.costs.shape)} and {tuple(self.capacity.shape)}")


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
    """

    out: torch.Tensor
    aux_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    selection: Selection
    z_loss: torch.Tensor | None = None


# Every metric of MoELayer is a per-batch mean; this is the batch quantity it is a mean over,
# i.e. the weight to average it over batches with (see MetricAverager):
#   count           inputs in the batch
#   selected_links  selected (expert, input) links in the batch (failed ones included)
METRIC_WEIGHTS = {
    "energy_j": "count",            # mean energy per input spent by this layer, J
    "experts_per_input": "count",   # mean number of effective experts (selected, not failed)
    "outage_rate": "selected_links",  # failed selected links / selected links
    "violation_rate": "count",      # share of inputs whose relevance target was not reachable
    "drop_rate": "count",           # share of inputs with no effective expert (passed through)
    "certified_rate": "count",      # share of inputs whose selection is proven optimal
    "nodes": "count",               # mean branch-and-bound nodes per input
    "gate_entropy": "count",        # mean entropy of the gate's softmax, nats
    "utilisation": "count",         # [K] share of inputs each expert effectively served
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
        self._metric_weights: dict[str, float] = {}  # name -> summed weight of the batches that had it
        self._weights: dict[str, float] = {"count": 0.0, "selected_links": 0.0}

    def update(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, weight_name in METRIC_WEIGHTS.items():
            if name not in metrics:
                continue
            weight = float(metrics[weight_name])
            value = metrics[name].detach().to("cpu", torch.float64) * weight
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._metric_weights[name] = self._metric_weights.get(name, 0.0) + weight
        for weight_name in self._weights:
            self._weights[weight_name] += float(metrics[weight_name])

    def compute(self) -> dict[str, float | list[float]]:
        result: dict[str, float | list[float]] = {}
        for name, total in self._sums.items():
            weight = self._metric_weights[name]
            mean = total / weight if weight > 0 else torch.zeros_like(total)
            result[name] = mean.tolist() if mean.dim() else float(mean)
        result.update(self._weights)
        if "utilisation" in self._sums:  # summed count x share = inputs each expert served
            result.update(load_metrics(self._sums["utilisation"]))
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
        return selection.mask.to(scores.device)
    k = BALANCE_K_OF_GAMMA_POLICIES if spec.policy in GAMMA_POLICIES else spec.k
    k = min(k, scores.shape[1])
    top = scores.detach().topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


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
    unchanged.  scores [B, K] (CPU); draws one uniform per (row, expert) from ``generator``.
    """
    effective = selection.mask & ~selection.failed
    drop = effective & (torch.rand(effective.shape, generator=generator) < p)
    lost_all = effective.any(1) & ~(effective & ~drop).any(1)
    if lost_all.any():
        best = scores.masked_fill(~effective, -math.inf).argmax(1)
        rows = lost_all.nonzero().squeeze(1)
        drop[rows, best[rows]] = False
    return replace(selection, failed=selection.failed | drop)


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
    The gate is ``nn.Linear(d_model, K)`` producing logits; the softmax is taken in forward.
    """

    def __init__(self, d_model: int, num_experts: int, hidden_mult: int = 2, link_dropout: float = 0.0,
                 combine: str = "renormalized", balance_on: str = "selection") -> None:
        super().__init__()
        for key, value in (("model.d_model", d_model), ("model.num_experts", num_experts),
                           ("model.hidden_mult", hidden_mult)):
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
        if h.dim() != 2 or h.shape[1] != self.d_model:
            raise ValueError(f"h must be [B, {self.d_model}], got {tuple(h.shape)}")
        B, K = h.shape[0], self.num_experts
        frames = costs if isinstance(costs, FrameLinks) else None
        if frames is not None:
            F = frames.costs.shape[0]
            if frames.costs.shape[1] != K or F == 0 or B % F:
                raise ValueError(f"FrameLinks must be [F, K={K}, N] with F dividing the {B} rows, got {tuple(frames.costs.shape)}")
            if delivered is not None:
                raise ValueError("image frames (FrameLinks) plan on the true channel: delivered must be None")
        elif costs.dim() != 3 or costs.shape[0] != B or costs.shape[1] != K:
            raise ValueError(f"costs must be [B={B}, K={K}, N], got {tuple(costs.shape)}")

        logits = self.gate(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax and combine weights in at least float32
        scores = torch.softmax(logits, dim=-1)
        scores_cpu = scores.detach().cpu()  # the router, link dropout and metrics work on the CPU

        with torch.no_grad():
            if frames is not None:
                plan = route_frames(
                    spec.policy, scores_cpu.view(F, B // F, K), frames.costs, frames.capacity,
                    gamma=spec.gamma, k=spec.k, k_min=spec.k_min, k_max=spec.k_max,
                    failure_energy=spec.failure_energy,
                )
                selection = token_selection(plan)
            else:
                selection = route(
                    spec.policy, scores_cpu, costs,
                    gamma=spec.gamma, k=spec.k, k_min=spec.k_min, k_max=spec.k_max,
                    failure_energy=spec.failure_energy, generator=generator,
                )
            if delivered is not None:
                selection = apply_delivery(selection, costs, delivered, spec.failure_energy)
            if self.training and self.link_dropout > 0:
                selection = drop_links(selection, scores_cpu, self.link_dropout, generator)
        effective_cpu = selection.mask & ~selection.failed
        effective = effective_cpu.to(h.device)
        weights = combine_weights(logits, scores, effective, self.combine)

        # Dispatch: gather the routed rows once, grouped by expert (expert-major order), run
        # each expert on its own group only, scale by w and scatter-add back onto h.
        routed = effective_cpu.t().nonzero()  # [M, 2] (expert, row), rows ascending per expert
        out = h
        if routed.numel():
            experts_of_slot = routed[:, 0].to(h.device)
            rows = routed[:, 1].to(h.device)
            counts = effective_cpu.sum(0).tolist()
            groups = h.index_select(0, rows).split(counts)
            expert_out = torch.cat(self.run_experts(counts, groups))
            slot_weights = weights[rows, experts_of_slot].unsqueeze(1).to(expert_out.dtype)
            out = h.index_add(0, rows, (expert_out * slot_weights).to(h.dtype))

        aux_loss = load_balancing_loss(scores, balance_mask(self.balance_on, selection, scores, spec))
        metrics = self._metrics(scores_cpu, selection, effective_cpu)
        return MoEOutput(out=out, aux_loss=aux_loss, metrics=metrics, selection=selection,
                         z_loss=router_z_loss(logits))

    def run_experts(self, counts: list[int], groups: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Run expert k on ``groups[k]`` ([counts[k], d], the rows routed to k); return the
        outputs of the non-empty groups in expert order.  A runtime (``dmoe_torch.runtime``)
        replaces this per layer, as an instance attribute, to run the experts elsewhere."""
        return [self.experts[k](group) for k, group in enumerate(groups) if counts[k]]

    @staticmethod
    def _metrics(scores: torch.Tensor, selection: Selection, effective: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means (see METRIC_WEIGHTS) as detached float64 CPU tensors."""
        B = effective.shape[0]
        inputs = max(B, 1)
        f64 = torch.float64
        selected_links = selection.mask.sum()
        s = scores.to("cpu", f64)
        entropy = -torch.special.xlogy(s, s).sum(1)
        return {
            "count": torch.tensor(float(B), dtype=f64),
            "selected_links": selected_links.to(f64),
            "energy_j": selection.energy.to(f64).sum() / inputs,
            "experts_per_input": effective.sum().to(f64) / inputs,
            "outage_rate": selection.failed.sum().to(f64) / max(int(selected_links), 1),
            "violation_rate": selection.violation.sum().to(f64) / inputs,
            "drop_rate": (~effective.any(1)).sum().to(f64) / inputs,
            "certified_rate": selection.certified.sum().to(f64) / inputs,
            "nodes": selection.nodes.sum().to(f64) / inputs,
            "gate_entropy": entropy.sum() / inputs,
            "utilisation": effective.sum(0).to(f64) / inputs,
            "single_expert_rate": (effective.sum(1) == 1).sum().to(f64) / inputs,
            "frame_overrun_rate": selection.frame_overrun.sum().to(f64) / inputs,
        }
