"""P3 benchmark (the image frame): the fast solver against the exact MILP, the baselines, speed.

Gap.  Seeded frames from the project's channel (WirelessChannel, K = 8 devices, N = 16
subcarriers, d_model = 128; capacities from `frame.frame_links`) and gate-like scores
(softmax of N(0, 2^2) logits), T = 49 tokens (a 7x7 image), k_min = 1, k_max = 8, for
several T_max and gamma.  Per cell: the share of frames P3-feasible (MILP), the share the
MILP proved optimal within its time limit, and for `frame_jesa` without and with price
rounds the share where it found a feasible plan, where it equals the optimum, where it is
certified, its mean / worst relative gap to the optimum and the bound's mean gap below it.
Plus tiny random frames (T, K, N <= 4, as in the tests) against the same MILP.

Random-frame gap.  Several thousand small random frames (T 2-6, K 2-4, N 2-4, in groups of
50 sharing a setting: Dirichlet, tied (quarters) or equal scores; uniform or tied integer
link costs; 0-40% links in outage; capacities 1-5; gamma 0.15-0.9; k_min 1-2, k_max k_min-K),
each solved by the MILP, and by frame_jesa as the MoE layer runs it (rescue rounds) with the
reassignment pass off (the solver before it), as the layer runs it (reassign_rounds 0: the
tokens' best responses with idle subcarriers) and in full (reassign_rounds 4): side by side
the share of feasible frames solved, the share solved optimally, the mean and worst relative
gap to the MILP and the frames above 10%.  The full pass also runs on the channel frames and
in the speed section (what it costs where N K = 128 and its deep moves are off).  With
--ckpt, the same three variants on a trained model's own frames (its gate scores at every
MoE layer, as benchmarks/bench_frame_trained.py draws them) against the MILP.

Baselines side by side (same frames): energy per frame, violating tokens, cut links per
frame, overrun frames, for frame_jesa, top-2 with channel-set capacity (Switch-style
dropping), top-2 ignoring capacity (overruns fail at P_ap T_max), des and jesa token by
token then truncated.

Speed.  256 frames of 49 tokens (one token-model batch at one MoE layer, 12,544 tokens) on
one thread: frame_jesa against token-frame JESA on the 12,544 tokens (each its own draw),
solvers alone and with the channel draw (what one MoE layer's routing costs per batch).

    python benchmarks/bench_frame.py            # defaults, a few minutes
    python benchmarks/bench_frame.py --quick    # a smoke run
    python benchmarks/bench_frame.py --ckpt outputs/default/checkpoint.pt   # + the trained model's frames

Writes benchmarks/results/frame.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.channel.links import frame_links  # noqa: E402
from dmoe_torch.selection.exact import milp_p3  # noqa: E402
from dmoe_torch.selection.frame_baselines import frame_tokenwise, frame_topk_capacity, frame_topk_overrun  # noqa: E402
from dmoe_torch.selection.frame_jesa import frame_jesa  # noqa: E402
from dmoe_torch.selection.jesa import jesa_numpy  # noqa: E402
from dmoe_torch.selection.registry import RESCUE_ROUNDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "frame.json"
EQUAL_RTOL = 1e-9
K, N, T, D_MODEL = 8, 16, 49, 128
# The full reassignment pass measured here (frame_jesa's default runs only its first step).
REASSIGN_ROUNDS = 4
# Random-frame variants side by side: label -> frame_jesa's reassign_rounds.
PASS_VARIANTS = {"before the pass": -1, "layer default": 0, "full pass": REASSIGN_ROUNDS}
RANDOM_GROUP = 50


def gate_scores(F: int, T: int, K: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 2.0, (F, T, K))
    s = np.exp(logits - logits.max(2, keepdims=True))
    return s / s.sum(2, keepdims=True)


def channel_frames(F: int, latency_s: float, seed: int):
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N, latency_budget_s=latency_s), K, D_MODEL, seed=seed)
    e, c = frame_links(channel, np.arange(F), layer=0, stream=seed)
    return channel, e, c


def gap_stats(fast, exact, proven):
    """Quality of `fast` on the frames the MILP proved (feasible and optimal)."""
    ok = exact.feasible & proven
    n = int(ok.sum())
    found = fast.feasible & ok
    gap = (fast.energy[found] - exact.energy[found]) / exact.energy[found]
    bound_gap = (exact.energy[ok] - fast.lower_bound[ok]) / exact.energy[ok]
    return {
        "proven_feasible": n,
        "found": float(found.sum() / n) if n else None,
        "optimal": float((found & (np.abs(fast.energy - exact.energy) <= EQUAL_RTOL * exact.energy)).sum() / n) if n else None,
        "certified": float((fast.certified & ok).sum() / n) if n else None,
        "mean_gap": float(gap.mean()) if gap.size else None,
        "worst_gap": float(gap.max()) if gap.size else None,
        "bound_gap": float(np.nanmean(bound_gap)) if n else None,
    }


def baseline_row(name, plan):
    return {
        "policy": name,
        "energy_mJ": float(plan.energy.mean() * 1e3),
        "violating_tokens": float(plan.violation.mean()),
        "dropped_tokens": float(plan.dropped.mean()),
        "cut_links": float(plan.cut.sum((1, 2)).mean()),
        "failed_links": float(plan.failed.sum((1, 2)).mean()),
        "overrun_frames": float(plan.overrun.mean()),
        "experts_per_token": float(plan.mask.sum(2).mean()),
    }


def channel_cell(F, latency_s, gamma, seed, price_rounds, time_limit):
    channel, e, c = channel_frames(F, latency_s, seed)
    s = gate_scores(F, T, K, seed + 1000)
    start = time.perf_counter()
    fast0 = frame_jesa(s, e, c, gamma, 1, K)
    t_fast0 = (time.perf_counter() - start) / F
    start = time.perf_counter()
    fast = frame_jesa(s, e, c, gamma, 1, K, price_rounds=price_rounds)
    t_fast = (time.perf_counter() - start) / F
    start = time.perf_counter()
    fast_r = frame_jesa(s, e, c, gamma, 1, K, reassign_rounds=REASSIGN_ROUNDS)
    t_fast_r = (time.perf_counter() - start) / F
    start = time.perf_counter()
    exact = milp_p3(s, e, c, gamma, 1, K, time_limit=time_limit)
    t_milp = (time.perf_counter() - start) / F
    proven = exact.certified | ~exact.feasible & np.isnan(exact.lower_bound)
    p_fail = channel.failure_energy_j
    baselines = [
        baseline_row("frame_jesa", fast),
        baseline_row("topk2_capacity", frame_topk_capacity(s, e, c, 2)),
        baseline_row("topk2_overrun", frame_topk_overrun(s, e, c, 2, p_fail)),
        baseline_row("des_tokenwise", frame_tokenwise(s, e, c, "des", gamma, 1, K)),
        baseline_row("jesa_tokenwise", frame_tokenwise(s, e, c, "jesa", gamma, 1, K)),
    ]
    return {
        "T_max_ms": latency_s * 1e3,
        "gamma": gamma,
        "frames": F,
        "feasible": float(exact.feasible.mean()),
        "milp_proven": float(exact.certified.sum() / max(exact.feasible.sum(), 1)),
        "mean_slots": float(c.max(1).sum(1).mean()),
        "fast": gap_stats(fast0, exact, proven),
        "fast_priced": gap_stats(fast, exact, proven),
        "fast_reassign": gap_stats(fast_r, exact, proven),
        "ms_per_frame": {
            "fast": t_fast0 * 1e3,
            "fast_priced": t_fast * 1e3,
            "fast_reassign": t_fast_r * 1e3,
            "milp": t_milp * 1e3,
        },
        "baselines": baselines,
    }


def tiny_cells(seeds, price_rounds):
    """Tiny random frames (the test generator's kind) against the MILP."""
    rng = np.random.default_rng(0)
    rows = []
    for Tt, Kt, Nt in ((2, 3, 3), (4, 4, 4), (4, 4, 2)):
        F = seeds
        s = rng.dirichlet(np.ones(Kt), size=(F, Tt))
        e = rng.uniform(1, 3, (F, Kt, Nt)) * 1e-5
        down = rng.random((F, Kt, Nt)) < 0.2
        e[down] = np.inf
        c = np.where(down, 0, rng.integers(1, 3, (F, Kt, Nt)))
        for gamma in (0.5, 0.9):
            exact = milp_p3(s, e, c, gamma, 1, 2)
            proven = np.ones(F, dtype=bool)
            rows.append(
                {
                    "T": Tt,
                    "K": Kt,
                    "N": Nt,
                    "gamma": gamma,
                    "frames": F,
                    "feasible": float(exact.feasible.mean()),
                    "fast": gap_stats(frame_jesa(s, e, c, gamma, 1, 2), exact, proven),
                    "fast_priced": gap_stats(frame_jesa(s, e, c, gamma, 1, 2, price_rounds=price_rounds), exact, proven),
                }
            )
    return rows


def random_groups(frames: int, seed: int):
    """Seeded small random frames in groups of RANDOM_GROUP sharing one setting: a list of
    (scores [G, T, K], costs [G, K, N] J, capacity [G, K, N], gamma, k_min, k_max)."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(frames // RANDOM_GROUP):
        Tr, Kr, Nr = (int(v) for v in rng.integers(2, (7, 5, 5)))
        kind = rng.integers(3)  # Dirichlet, tied (quarters), equal scores
        s = rng.dirichlet(np.ones(Kr), size=(RANDOM_GROUP, Tr))
        if kind == 1:
            s = np.round(s * 4) + 1e-9
            s /= s.sum(2, keepdims=True)
        elif kind == 2:
            s = np.full_like(s, 1.0 / Kr)
        tied_costs = rng.random() < 0.5
        e = (rng.integers(1, 6, (RANDOM_GROUP, Kr, Nr)) if tied_costs else rng.uniform(1, 5, (RANDOM_GROUP, Kr, Nr))) * 1e-5
        down = rng.random((RANDOM_GROUP, Kr, Nr)) < rng.choice([0.0, 0.2, 0.4])
        e = np.where(down, np.inf, e)
        c = np.where(down, 0, rng.integers(1, int(rng.choice([1, 2, 3, 5])) + 1, (RANDOM_GROUP, Kr, Nr)))
        gamma = float(rng.choice([0.15, 0.3, 0.5, 0.7, 0.9]))
        k_min = int(rng.choice([1, 1, 2]))
        k_max = int(rng.integers(k_min, Kr + 1))
        groups.append((s, e, c, gamma, k_min, k_max))
    return groups


def random_gap(frames: int, seed: int):
    """The random-frame gap section: per PASS_VARIANTS label, the share of P3-feasible
    frames solved and solved optimally, mean / worst gap over those solved, frames above
    10%, ms per frame; plus the MILP's share of feasible frames."""
    groups = random_groups(frames, seed)
    exact = [milp_p3(*group) for group in groups]
    feasible = np.concatenate([plan.feasible for plan in exact])
    rows = {}
    for label, reassign in PASS_VARIANTS.items():
        frame_jesa(*groups[0], rescue_rounds=RESCUE_ROUNDS, reassign_rounds=reassign)  # compile
        gaps, found, elapsed = [], [], 0.0
        for group, plan in zip(groups, exact, strict=True):
            start = time.perf_counter()
            fast = frame_jesa(*group, rescue_rounds=RESCUE_ROUNDS, reassign_rounds=reassign)
            elapsed += time.perf_counter() - start
            both = fast.feasible & plan.feasible
            gaps.append(fast.energy[both] / plan.energy[both] - 1)
            found.append(both)
        gaps = np.concatenate(gaps)
        rows[label] = {
            "reassign_rounds": reassign,
            "found": float(np.concatenate(found).sum() / feasible.sum()),
            "optimal": float((gaps <= EQUAL_RTOL).sum() / feasible.sum()),
            "mean_gap": float(gaps.mean()),
            "worst_gap": float(gaps.max()),
            "above_10pct": int((gaps > 0.1).sum()),
            "ms_per_frame": elapsed / feasible.size * 1e3,
        }
    return {
        "frames": int(feasible.size),
        "feasible_frames": int(feasible.sum()),
        "seed": seed,
        "rescue_rounds": RESCUE_ROUNDS,
        "variants": rows,
    }


def trained_gap(ckpt: str, frames: int, gammas, latencies, k_max: int, time_limit: float, data_root: str):
    """The PASS_VARIANTS on a checkpoint's own image frames (bench_frame_trained.trained_frames:
    the first `frames` test images, every MoE layer) against the MILP: per (T_max, gamma,
    layer) the share of frames P3-feasible and each variant's gap_stats and ms per frame."""
    from bench_frame_trained import trained_frames
    from omegaconf import OmegaConf

    from dmoe_torch.data import build_datasets
    from dmoe_torch.engine.build import build_model
    from dmoe_torch.engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint["config"])
    _, _, test_ds, info = build_datasets(cfg.data.name, data_root, val_size=0, seed=0, limit_test=frames)
    model = build_model(cfg, info)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    images, _, ids = next(iter(torch.utils.data.DataLoader(test_ds, batch_size=frames)))
    rows = []
    for latency_s in latencies:
        for gamma in gammas:
            for layer, (s, e, c) in enumerate(trained_frames(model, cfg, images, ids, latency_s, gamma, k_max)):
                exact = milp_p3(s, e, c, gamma, 1, k_max, time_limit=time_limit)
                proven = exact.certified | ~exact.feasible & np.isnan(exact.lower_bound)
                row = {
                    "T_max_ms": latency_s * 1e3,
                    "gamma": gamma,
                    "layer": layer + 1,
                    "frames": len(s),
                    "feasible": float(exact.feasible.mean()),
                    "milp_proven": float(proven.mean()),
                    "variants": {},
                }
                for label, reassign in PASS_VARIANTS.items():
                    start = time.perf_counter()
                    plan = frame_jesa(s, e, c, gamma, 1, k_max, rescue_rounds=RESCUE_ROUNDS, reassign_rounds=reassign)
                    row["variants"][label] = {
                        **gap_stats(plan, exact, proven),
                        "ms_per_frame": (time.perf_counter() - start) / len(s) * 1e3,
                    }
                rows.append(row)
    return {
        "ckpt": ckpt,
        "frames": frames,
        "k_max": k_max,
        "rescue_rounds": RESCUE_ROUNDS,
        "milp_time_limit_s": time_limit,
        "rows": rows,
    }


def speed(F, latency_s, gamma, repeats):
    _, e, c = channel_frames(F, latency_s, 7)
    s = gate_scores(F, T, K, 8)
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N, latency_budget_s=latency_s), K, D_MODEL, seed=7)
    e_tok = channel.costs(np.arange(F * T), layer=0, stream=7).numpy()
    s_tok = s.reshape(F * T, K)
    frame_jesa(s[:2], e[:2], c[:2], gamma, 1, K)  # compile
    jesa_numpy(s_tok[:2], e_tok[:2], gamma, 1, K)

    def best_of(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_frame = best_of(lambda: frame_jesa(s, e, c, gamma, 1, K))
    t_frame_r = best_of(lambda: frame_jesa(s, e, c, gamma, 1, K, reassign_rounds=REASSIGN_ROUNDS))
    t_token = best_of(lambda: jesa_numpy(s_tok, e_tok, gamma, 1, K))
    return {
        "frames": F,
        "tokens": F * T,
        "gamma": gamma,
        "T_max_ms": latency_s * 1e3,
        "frame_jesa_ms": t_frame * 1e3,
        "frame_jesa_full_pass_ms": t_frame_r * 1e3,
        "token_jesa_ms": t_token * 1e3,
        "ratio": t_frame / t_token,
    }


def pipeline(F, latency_s, gamma, repeats):
    """One MoE layer's routing for one token-model batch (F images x T tokens), channel draw
    included: token frames (costs of F*T draws, JESA on F*T rows) against image frames
    (costs and capacities of F draws, frame_jesa, the token-level Selection view)."""
    from dmoe_torch.selection.frame import token_selection

    channel = WirelessChannel(ChannelConfig(num_subcarriers=N, latency_budget_s=latency_s), K, D_MODEL, seed=9)
    s = gate_scores(F, T, K, 10)
    s_tok = s.reshape(F * T, K)

    def token_frames():
        e_tok = channel.costs(np.arange(F * T), layer=0, stream=0).numpy()
        return jesa_numpy(s_tok, e_tok, gamma, 1, K)

    def image_frames():
        e, c = frame_links(channel, np.arange(F), layer=0, stream=0)
        return token_selection(frame_jesa(s, e, c, gamma, 1, K))

    token_frames()
    image_frames()
    times = {}
    for name, fn in (("token_frames", token_frames), ("image_frames", image_frames)):
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        times[name + "_ms"] = best * 1e3
    times["ratio"] = times["image_frames_ms"] / times["token_frames_ms"]
    return {"frames": F, "tokens": F * T, "gamma": gamma, "T_max_ms": latency_s * 1e3, **times}


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def print_random(rnd: dict) -> None:
    """The random-frame gap section."""
    print(
        f"P3 on {rnd['frames']} small random frames ({rnd['feasible_frames']} P3-feasible), frame_jesa with "
        f"{RESCUE_ROUNDS} rescue rounds as the MoE layer runs it, against the MILP:"
    )
    print(f"  {'':<16} {'reassign':>8} {'found':>6} {'optimal':>7} {'mean gap':>9} {'worst gap':>9} {'>10%':>5} {'ms/frame':>8}")
    for label, r in rnd["variants"].items():
        print(
            f"  {label:<16} {r['reassign_rounds']:>8} {r['found']:6.3f} {r['optimal']:7.3f} {r['mean_gap']:9.2e} "
            f"{r['worst_gap']:9.2e} {r['above_10pct']:5d} {r['ms_per_frame']:8.2f}"
        )


def print_trained(trained: dict, ckpt: str, frames: int) -> None:
    """The gap on a trained model's own frames."""
    print(
        f"P3 on the frames of {ckpt} ({frames} test images, k_max 2, {RESCUE_ROUNDS} rescue rounds), "
        f"against the MILP: found / optimal / mean gap / worst gap / ms per frame, per variant"
    )
    print("T_max | gamma | layer | feasible | " + " | ".join(PASS_VARIANTS))
    for row in trained["rows"]:
        cells = [
            f"{fmt(v['found'], '.2f')} {fmt(v['optimal'], '.2f')} {fmt(v['mean_gap'], '.1e')} "
            f"{fmt(v['worst_gap'], '.1e')} {v['ms_per_frame']:.1f}"
            for v in row["variants"].values()
        ]
        head = [f"{row['T_max_ms']:g} ms", f"{row['gamma']:g}", str(row["layer"]), f"{row['feasible']:.2f}"]
        print(" | ".join(head + cells))


def channel_section(F: int, latencies, gammas, price_rounds: int, time_limit: float) -> list[dict]:
    """The channel-frame cells against the MILP, printed as they finish."""
    print(
        f"P3 on channel frames: K={K}, N={N}, T={T}, {F} frames per cell, MILP limit {time_limit:g} s "
        f"(+p: {price_rounds} price rounds, +r: the full reassignment pass, {REASSIGN_ROUNDS} sweeps)"
    )
    header = (
        "T_max",
        "gamma",
        "feas",
        "slots",
        "found",
        "found+p",
        "opt",
        "opt+p",
        "cert+p",
        "mean gap",
        "worst gap",
        "mean gap+p",
        "worst gap+p",
        "bound gap+p",
        "mean gap+r",
        "worst gap+r",
        "ms fast",
        "ms +p",
        "ms +r",
        "ms MILP",
    )
    print(" | ".join(header))
    cells = []
    for latency_s in latencies:
        for gamma in gammas:
            row = channel_cell(F, latency_s, gamma, 0, price_rounds, time_limit)
            cells.append(row)
            a, b, r, ms = row["fast"], row["fast_priced"], row["fast_reassign"], row["ms_per_frame"]
            print(
                " | ".join(
                    [
                        f"{latency_s * 1e3:g} ms",
                        f"{gamma:.1f}",
                        f"{row['feasible']:.2f}",
                        f"{row['mean_slots']:.0f}",
                        fmt(a["found"], ".2f"),
                        fmt(b["found"], ".2f"),
                        fmt(a["optimal"], ".2f"),
                        fmt(b["optimal"], ".2f"),
                        fmt(b["certified"], ".2f"),
                        fmt(a["mean_gap"], ".2e"),
                        fmt(a["worst_gap"], ".2e"),
                        fmt(b["mean_gap"], ".2e"),
                        fmt(b["worst_gap"], ".2e"),
                        fmt(b["bound_gap"], ".2e"),
                        fmt(r["mean_gap"], ".2e"),
                        fmt(r["worst_gap"], ".2e"),
                        f"{ms['fast']:.1f}",
                        f"{ms['fast_priced']:.1f}",
                        f"{ms['fast_reassign']:.1f}",
                        f"{ms['milp']:.0f}",
                    ]
                )
            )
    return cells


def print_baselines(cells: list[dict]) -> None:
    """The frame baselines on the channel cells' frames."""
    print(
        "\nBaselines side by side (same frames): energy mJ/frame, violating tokens, cut / failed links per frame, overrun frames"
    )
    for row in cells:
        print(f"T_max {row['T_max_ms']:g} ms, gamma {row['gamma']:.1f}")
        for b in row["baselines"]:
            print(
                f"  {b['policy']:<15} {b['energy_mJ']:7.3f} mJ  viol {b['violating_tokens']:.3f}  "
                f"cut {b['cut_links']:6.2f}  failed {b['failed_links']:6.2f}  overrun {b['overrun_frames']:.2f}  "
                f"experts/token {b['experts_per_token']:.2f}"
            )


def print_tiny(tiny: list[dict]) -> None:
    """The tiny random frames against the MILP."""
    print(
        "\nTiny random frames (k_max = 2) against the MILP: found / optimal / certified / mean gap / worst gap (plain | priced)"
    )
    for r in tiny:
        a, b = r["fast"], r["fast_priced"]
        print(
            f"  T={r['T']} K={r['K']} N={r['N']} gamma={r['gamma']}: feasible {r['feasible']:.2f} | "
            f"{fmt(a['found'], '.2f')} {fmt(a['optimal'], '.2f')} {fmt(a['certified'], '.2f')} "
            f"{fmt(a['mean_gap'], '.1e')} {fmt(a['worst_gap'], '.1e')} | "
            f"{fmt(b['found'], '.2f')} {fmt(b['optimal'], '.2f')} {fmt(b['certified'], '.2f')} "
            f"{fmt(b['mean_gap'], '.1e')} {fmt(b['worst_gap'], '.1e')}"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--random-frames", type=int, default=None, help="random frames for the gap section (default 4000)")
    parser.add_argument("--ckpt", default=None, help="a checkpoint: also the gap on its own frames")
    parser.add_argument("--ckpt-frames", type=int, default=16)
    parser.add_argument("--ckpt-gammas", type=float, nargs="+", default=[0.15, 0.25])
    parser.add_argument("--ckpt-latency", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    F = 4 if args.quick else 16
    price_rounds = 8
    time_limit = 5.0 if args.quick else 10.0
    latencies = (1e-3, 2e-3) if args.quick else (1e-3, 2e-3, 4e-3)
    gammas = (0.3, 0.8) if args.quick else (0.3, 0.5, 0.8)

    out = {
        "setting": {
            "K": K,
            "N": N,
            "T": T,
            "d_model": D_MODEL,
            "k_min": 1,
            "k_max": K,
            "price_rounds": price_rounds,
            "reassign_rounds": REASSIGN_ROUNDS,
            "milp_time_limit_s": time_limit,
        }
    }
    random_frames = args.random_frames or (500 if args.quick else 4000)
    rnd = random_gap(random_frames, seed=0)
    out["random"] = rnd
    print_random(rnd)
    print()
    if args.ckpt is None:
        print("No --ckpt: the trained model's frames are skipped.\n")
    else:
        trained = trained_gap(args.ckpt, args.ckpt_frames, args.ckpt_gammas, args.ckpt_latency, 2, time_limit, args.data_root)
        out["trained"] = trained
        print_trained(trained, args.ckpt, args.ckpt_frames)
        print()

    cells = channel_section(F, latencies, gammas, price_rounds, time_limit)
    out["channel"] = cells

    print_baselines(cells)

    tiny = tiny_cells(20 if args.quick else 100, price_rounds)
    out["tiny"] = tiny
    print_tiny(tiny)

    sp = speed(64 if args.quick else 256, 1e-3, 0.5, 2 if args.quick else 3)
    out["speed"] = sp
    print(
        f"\nSpeed, one thread: {sp['frames']} frames x {T} tokens: frame_jesa {sp['frame_jesa_ms']:.1f} ms "
        f"(with the full reassignment pass {sp['frame_jesa_full_pass_ms']:.1f} ms), "
        f"token-frame JESA on the {sp['tokens']} tokens {sp['token_jesa_ms']:.1f} ms (ratio {sp['ratio']:.2f})"
    )
    pipe = pipeline(64 if args.quick else 256, 1e-3, 0.5, 2 if args.quick else 3)
    out["pipeline"] = pipe
    print(
        f"Routing one MoE layer, channel draw included: token frames {pipe['token_frames_ms']:.1f} ms, "
        f"image frames {pipe['image_frames_ms']:.1f} ms (ratio {pipe['ratio']:.2f})"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
