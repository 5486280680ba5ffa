"""JESA benchmark: optimality against the exact P2 MILP, and throughput.

Quality.  Seeded instances from the project's channel model (WirelessChannel: K devices in
the cell, Rayleigh fading per subcarrier, energies in J, outages as +inf) and gate-like
scores (softmax of N(0, 2^2) logits).  For N/K in {1, 2, 4, 8} and several importance
factors gamma it reports, over the P2-feasible instances: the share JESA certifies optimal,
the share where JESA equals the MILP optimum, the mean and worst relative gap to it, the mean
number of DES solves, and side by side the gap of "DES under c*, then min-cost assignment"
(JESA's first candidate) and of P1 on the static plan a(k) = k mod N (policy ``des``, only
where N >= K).

Throughput.  K=16, N=32 on one core: JESA (numba, whole batch), DES alone under c* (JESA's
first step, for its overhead), and scipy.optimize.milp one instance at a time; plus the
router's call pattern (torch API, batches of 256, K=8, N=16).

    python benchmarks/bench_jesa.py            # defaults, < 3 minutes
    python benchmarks/bench_jesa.py --quick    # a smoke run

Writes benchmarks/results/jesa.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # one core: the throughput figures are single-threaded

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.selection import jesa  # noqa: E402
from dmoe_torch.selection.des import des_numpy  # noqa: E402
from dmoe_torch.selection.exact import milp_p2  # noqa: E402
from dmoe_torch.selection.jesa import jesa_numpy, min_cost_assignment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "jesa.json"
EQUAL_RTOL = 1e-9  # "JESA == optimum" within this relative tolerance


def make_instances(K: int, N: int, B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gate-like scores [B, K] and channel costs [B, K, N] (J, +inf outage), seeded."""
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N), num_devices=K, d_model=128, seed=seed)
    costs = channel.costs(torch.arange(B), layer=0, stream=N).numpy()
    logits = np.random.default_rng([seed, N]).normal(0.0, 2.0, (B, K))
    scores = np.exp(logits - logits.max(1, keepdims=True))
    return scores / scores.sum(1, keepdims=True), costs


def static_des_energy(s: np.ndarray, e: np.ndarray, gamma: float, K: int) -> np.ndarray:
    """P1 optimum on the static plan a(k) = k mod N (nan where infeasible)."""
    N = e.shape[2]
    static = e[:, np.arange(K), np.arange(K) % N]
    _, energy, violation, _, _, _ = des_numpy(s, static, gamma, 1, min(K, N))
    return np.where(violation, np.nan, energy)


def quality(K: int, ratios, gammas, B: int, seed: int) -> list[dict]:
    rows = []
    for ratio in ratios:
        N = K * ratio
        s, e = make_instances(K, N, B, seed)
        for gamma in gammas:
            r = jesa_numpy(s, e, gamma, 1, K)
            ref = milp_p2(torch.from_numpy(s), torch.from_numpy(e), gamma, 1, None)
            opt = ref.energy.numpy()
            feasible = ~ref.violation.numpy()
            assert np.array_equal(r.violation, ~feasible), "JESA and the MILP disagree on feasibility"
            gap = (r.energy - opt)[feasible] / opt[feasible]
            # JESA's first candidate: DES under c*, then the min-cost assignment
            first_mask, _, first_violation, _, _, _ = des_numpy(s, e.min(2), gamma, 1, min(K, N))
            _, first_energy = min_cost_assignment(e, first_mask)
            first_energy = np.where(first_violation, np.inf, first_energy)[feasible]
            first_ok = np.isfinite(first_energy)
            first_gap = (first_energy[first_ok] - opt[feasible][first_ok]) / opt[feasible][first_ok]
            row = dict(
                K=K,
                N=N,
                N_over_K=ratio,
                gamma=gamma,
                instances=B,
                feasible=int(feasible.sum()),
                certified_share=float(r.certified[feasible].mean()),
                optimal_share=float((gap <= EQUAL_RTOL).mean()),
                mean_gap=float(gap.mean()),
                worst_gap=float(gap.max()),
                mean_iterations=float(r.iterations[feasible].mean()),
                first_candidate_optimal_share=float((first_gap <= EQUAL_RTOL).mean()),
                first_candidate_mean_gap=float(first_gap.mean()),
                first_candidate_infeasible=int((~first_ok).sum()),
            )
            if N >= K:
                static = static_des_energy(s, e, gamma, K)[feasible]
                ok = np.isfinite(static)
                row["static_des_over_optimal"] = float(np.mean(static[ok] / opt[feasible][ok]))
                row["static_des_infeasible_share"] = float(1.0 - ok.mean())
            rows.append(row)
    return rows


def _rate(fn, count: int, repeats: int = 2) -> float:
    """Instances per second of fn() (best of `repeats`)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def throughput(gammas, B: int, milp_instances: int, seed: int) -> list[dict]:
    K, N = 16, 32
    s, e = make_instances(K, N, B, seed)
    jesa_numpy(s[:8], e[:8], 0.8, 1, K)  # compile / load the numba cache outside the timing
    rows = []
    for gamma in gammas:
        jesa_rate = _rate(lambda: jesa_numpy(s, e, gamma, 1, K), B)
        cstar = e.min(2)
        des_rate = _rate(lambda: des_numpy(s, cstar, gamma, 1, K), B)
        milp_rate = _rate(
            lambda: milp_p2(torch.from_numpy(s[:milp_instances]), torch.from_numpy(e[:milp_instances]), gamma, 1, None),
            milp_instances,
            repeats=1,
        )
        r = jesa_numpy(s, e, gamma, 1, K)
        rows.append(
            dict(
                K=K,
                N=N,
                gamma=gamma,
                instances=B,
                jesa_per_s=jesa_rate,
                des_only_per_s=des_rate,
                milp_per_s=milp_rate,
                jesa_over_milp=jesa_rate / milp_rate,
                certified_share=float(r.certified[~r.violation].mean()),
                mean_iterations=float(r.iterations.mean()),
                mean_selected=float(r.mask.sum(1).mean()),
            )
        )
    return rows


def router_call(seed: int, calls: int = 200) -> dict:
    """The MoE layer's pattern: the torch API on batches of 256, K=8, N=16."""
    K, N, B = 8, 16, 256
    s, e = make_instances(K, N, B * 4, seed)
    scores = torch.from_numpy(s).float()
    costs = torch.from_numpy(e)
    jesa(scores[:B], costs[:B], 0.8)
    start = time.perf_counter()
    for i in range(calls):
        lo = (i % 4) * B
        jesa(scores[lo : lo + B], costs[lo : lo + B], 0.8)
    per_call = (time.perf_counter() - start) / calls
    return dict(K=K, N=N, batch=B, gamma=0.8, microseconds_per_call=per_call * 1e6)


def _print_quality(rows):
    head = (
        f"{'N/K':>4} {'N':>3} {'gamma':>5} {'feas':>5} {'cert':>6} {'=opt':>6} {'mean gap':>9} "
        f"{'worst gap':>9} {'iters':>5} | {'first =opt':>10} {'first gap':>9} | {'static/opt':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        static = f"{r['static_des_over_optimal']:10.3f}" if "static_des_over_optimal" in r else f"{'-':>10}"
        print(
            f"{r['N_over_K']:>4} {r['N']:>3} {r['gamma']:>5.2f} {r['feasible']:>5} {r['certified_share']:6.1%} "
            f"{r['optimal_share']:6.1%} {r['mean_gap']:9.2e} {r['worst_gap']:9.2e} {r['mean_iterations']:5.2f} | "
            f"{r['first_candidate_optimal_share']:10.1%} {r['first_candidate_mean_gap']:9.2e} | {static}"
        )


def _print_throughput(rows):
    head = f"{'gamma':>5} {'JESA/s':>9} {'DES-only/s':>10} {'MILP/s':>7} {'JESA/MILP':>9} {'cert':>6} {'iters':>5} {'|S|':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['gamma']:>5.2f} {r['jesa_per_s']:9.0f} {r['des_only_per_s']:10.0f} {r['milp_per_s']:7.1f} "
            f"{r['jesa_over_milp']:9.0f} {r['certified_share']:6.1%} {r['mean_iterations']:5.2f} {r['mean_selected']:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8, help="K for the quality table")
    parser.add_argument("--instances", type=int, default=150, help="instances per quality cell")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 2, 4, 8], help="N/K values")
    parser.add_argument("--throughput-instances", type=int, default=20000)
    parser.add_argument("--milp-instances", type=int, default=30, help="instances the MILP timing solves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.throughput_instances, args.milp_instances = 30, 2000, 10

    start = time.perf_counter()
    print(f"JESA vs exact P2 (scipy milp), K={args.experts}, {args.instances} channel instances per cell")
    print("cert: certified optimal; =opt: equals the MILP optimum; gap: (E - E*)/E* over feasible instances;")
    print("first: DES under c* + min-cost assignment (JESA's first candidate); static/opt: P1 on a(k)=k mod N / E*\n")
    quality_rows = quality(args.experts, args.ratios, args.gammas, args.instances, args.seed)
    _print_quality(quality_rows)

    print("\nThroughput, K=16, N=32, one core (instances/s)")
    throughput_rows = throughput(args.gammas, args.throughput_instances, args.milp_instances, args.seed)
    _print_throughput(throughput_rows)
    router = router_call(args.seed)
    print(
        f"\nRouter call (torch API, validation included): B={router['batch']}, K={router['K']}, "
        f"N={router['N']}: {router['microseconds_per_call']:.0f} us per call"
    )
    elapsed = time.perf_counter() - start
    print(f"\ntotal {elapsed:.1f} s")

    payload = dict(
        benchmark="jesa",
        settings=dict(vars(args)),
        quality=quality_rows,
        throughput=throughput_rows,
        router_call=router,
        seconds=elapsed,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
