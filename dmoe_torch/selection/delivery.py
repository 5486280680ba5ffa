"""What the channel delivers of a routing decision planned on estimated CSI.

A policy plans on ``planned_costs`` (the gain the coordinator believes in); the coordinator
then transmits at the rate planned for each selected link.  Where the true channel cannot
carry that rate (``delivered`` False, see ``WirelessChannel.link_state``) the attempt fails
like a channel-unaware policy's attempt on a link in outage: the expert's output is lost and
the coordinator spends ``failure_energy`` (P_ap * T_max: it transmits until the latency
budget runs out) instead of the planned link energy.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .baselines import check_failure_energy
from .common import Selection


def apply_delivery(
    selection: Selection, planned_costs: torch.Tensor, delivered: torch.Tensor, failure_energy: float
) -> Selection:
    """The realised Selection: selected links that were not delivered become failed.

    selection: planned on ``planned_costs`` [B, K, N] (J); delivered [B, K, N] bool.
    A selected, not yet failed expert k of row b on subcarrier n = subcarrier[b, k] with
    delivered[b, k, n] False becomes failed, and the row's energy is recomputed as
    sum of the planned costs of its delivered links + failure_energy per failed link.
    Links already failed stay failed (their energy is already failure_energy).  Rows with
    no new failure are returned unchanged (bit for bit).  ``dropped`` is set where every
    selected link has now failed, and ``violation`` with it (as for every policy);
    ``certified`` and ``lower_bound`` still describe the planned problem.
    """
    failure_energy = check_failure_energy(failure_energy)
    B, K = selection.mask.shape
    if delivered.dtype != torch.bool or delivered.dim() != 3 or delivered.shape[:2] != (B, K):
        raise ValueError(f"delivered must be a bool tensor [B={B}, K={K}, N], got {delivered.dtype} {tuple(delivered.shape)}")
    if planned_costs.shape != delivered.shape:
        raise ValueError(f"planned_costs shape {tuple(planned_costs.shape)} must equal delivered shape {tuple(delivered.shape)}")
    subcarrier = selection.subcarrier.clamp(min=0).unsqueeze(2)  # [B, K, 1]; -1 only where unselected
    link_delivered = delivered.to(selection.mask.device).gather(2, subcarrier).squeeze(2)
    lost = selection.mask & ~selection.failed & ~link_delivered
    touched = lost.any(1)
    if not touched.any():
        return selection
    failed = selection.failed | lost
    link_cost = planned_costs.to(selection.energy.device, torch.float64).gather(2, subcarrier).squeeze(2)
    carried = selection.mask & ~failed
    recomputed = torch.where(carried, link_cost, torch.zeros_like(link_cost)).sum(1)
    recomputed = recomputed + failure_energy * failed.sum(1).to(torch.float64)
    dropped = selection.dropped | (touched & ~carried.any(1))
    return replace(
        selection,
        failed=failed,
        energy=torch.where(touched, recomputed, selection.energy),
        dropped=dropped,
        violation=selection.violation | dropped,
        frame_overrun=selection.frame_overrun | lost.any(1),  # a link that missed its rate missed T_max
    )
