"""Baselines under the image-frame model of frame.py (P3, docs/method.md section 11).

:func:`frame_topk_capacity` (Switch-style dropping), :func:`frame_topk_overrun` (capacity
ignored: links beyond it fail at P_ap T_max each) and :func:`frame_tokenwise` (des / jesa
token by token, then truncated to capacity).
"""

from __future__ import annotations

import numpy as np

from .des import des_numpy
from .frame import FrameSelection, plan_from_owner, static_owner, validate_frame_inputs

__all__ = ["frame_topk_capacity", "frame_topk_overrun", "frame_tokenwise"]


def _topk_mask(s: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores of every token (ties: lower index), bool [F, T, K]."""
    ranked = np.argsort(-s, axis=2, kind="stable")[:, :, :k]
    mask = np.zeros(s.shape, dtype=np.bool_)
    np.put_along_axis(mask, ranked, True, axis=2)
    return mask


def frame_topk_capacity(scores, costs, capacity, k: int) -> FrameSelection:
    """Switch-style top-k: every token asks its k best-scored experts; the static partition
    n mod K gives each device its capacity; tokens beyond it (in token order) lose that
    link (``cut``; a token left with no expert is ``dropped``).  violation = dropped."""
    s, e, c, _, _, _ = validate_frame_inputs(scores, costs, capacity, 1.0, 1, None)
    owner = np.broadcast_to(static_owner(s.shape[2], e.shape[2]), (s.shape[0], e.shape[2]))
    result = plan_from_owner(s, e, c, owner, _topk_mask(s, k), 1.0, 1)
    result.violation = result.dropped.copy()
    result.feasible = ~result.violation.any(1)
    return result


def frame_topk_overrun(scores, costs, capacity, k: int, failure_energy: float) -> FrameSelection:
    """Top-k ignoring capacity: every wanted link is sent on the static partition; those
    beyond a device's capacity (in token order; all of them on a device whose links are in
    outage) miss T_max: ``failed``, output lost, ``failure_energy`` J each (P_ap T_max), and
    the frame is an ``overrun``.  violation = dropped."""
    s, e, c, _, _, _ = validate_frame_inputs(scores, costs, capacity, 1.0, 1, None)
    owner = np.broadcast_to(static_owner(s.shape[2], e.shape[2]), (s.shape[0], e.shape[2]))
    result = plan_from_owner(s, e, c, owner, _topk_mask(s, k), 1.0, 1, failed_energy=float(failure_energy))
    result.violation = result.dropped.copy()
    result.feasible = ~result.violation.any(1)
    return result


def frame_tokenwise(
    scores, costs, capacity, policy: str, gamma: float, k_min: int = 1, k_max: int | None = None
) -> FrameSelection:
    """des or jesa token by token, each token as if it had the band alone, then truncated.

    des: P1 per token on the static partition (device k's cheapest own subcarrier), sent on
    that partition.  jesa: P2 per token on the frame's costs; each subcarrier goes to the
    device the most tokens put on it (ties: lower index).  Then device k's tokens, in token
    order, fill its subcarriers; links beyond its capacity are ``cut``; violation: the
    token's remaining links miss gamma or k_min."""
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    F, T, K = s.shape
    N = e.shape[2]
    if policy == "des":
        owner = np.broadcast_to(static_owner(K, N), (F, N)).copy()
        own = owner[:, None, :] == np.arange(K)[None, :, None]  # [F, K, N]
        c_static = np.where(own & (c > 0), e, np.inf).min(2)
        flat = np.broadcast_to(c_static[:, None, :], (F, T, K)).reshape(F * T, K)
        want = des_numpy(s.reshape(F * T, K), flat, gamma, k_min, k_max)[0].reshape(F, T, K)
    elif policy == "jesa":
        from .jesa import jesa_numpy

        flat_e = np.broadcast_to(e[:, None], (F, T, K, N)).reshape(F * T, K, N)
        out = jesa_numpy(s.reshape(F * T, K), np.ascontiguousarray(flat_e), gamma, k_min, k_max)
        want = out.mask.reshape(F, T, K)
        sub = out.subcarrier.reshape(F, T, K)
        votes = np.zeros((F, N, K), dtype=np.int64)
        f_idx, t_idx, k_idx = np.nonzero(want & (sub >= 0))
        np.add.at(votes, (f_idx, sub[f_idx, t_idx, k_idx], k_idx), 1)
        owner = np.where(votes.max(2) > 0, votes.argmax(2), -1).astype(np.int64)
    else:
        raise ValueError(f"policy must be 'des' or 'jesa', got {policy!r}")
    return plan_from_owner(s, e, c, owner, want, gamma, k_min)
