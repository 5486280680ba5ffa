"""DES benchmark: speed and exactness against HiGHS (scipy.optimize.milp), brute force and the
pure-Python reference, on one CPU core.

Two settings (issue 4):
  small: batches of 4096 instances, K=16, k_max=4, gammas 0.5/0.8/0.95 -> instances/s;
  large: K=1024, k_max=8, one instance at a time -> median and worst ms per instance.
Scores are softmax(normal logits * logit_std); costs come from WirelessChannel with the
default ChannelConfig (outages included), expert k on its static subcarrier k mod N.

    python benchmarks/bench_des.py            # < 3 minutes
    python benchmarks/bench_des.py --help

Prints one table (every method side by side with its speed-up over MILP, mean/max B&B nodes
next to the number of subsets brute force enumerates, and mismatches against MILP) and writes
benchmarks/results/des.json.
"""

from __future__ import annotations

import os

# one core for every solver; must be set before numba / torch / BLAS start their pools
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.selection.des import des, des_numpy  # noqa: E402
from dmoe_torch.selection.exact import brute_force_p1, des_reference, milp_p1, subset_count  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "des.json"


def make_instances(batch: int, num_experts: int, logit_std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scores [B, K] softmax(normal * logit_std); costs [B, K] J from WirelessChannel (static k mod N)."""
    channel = WirelessChannel(ChannelConfig(), num_experts, d_model=128, seed=seed)
    link_costs = channel.costs(torch.arange(batch), layer=0, stream=0).numpy()  # [B, K, N]
    experts = np.arange(num_experts)
    costs = np.ascontiguousarray(link_costs[:, experts, experts % link_costs.shape[2]])
    logits = np.random.default_rng(seed).normal(size=(batch, num_experts)) * logit_std
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    return scores, costs


def mismatches(energy_a, violation_a, energy_b, violation_b) -> int:
    """Rows whose feasibility differs or whose optimal energies differ by more than 1e-9 relative."""
    energy_a, energy_b = np.asarray(energy_a), np.asarray(energy_b)
    same = (np.asarray(violation_a) == np.asarray(violation_b)) & np.isclose(energy_a, energy_b, rtol=1e-9, atol=0.0)
    return int((~same).sum())


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall time in s over repeats)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def per_instance_times(fn, count: int) -> tuple[list, np.ndarray]:
    """Call fn(i) for i < count; returns (results, seconds per call)."""
    outs, seconds = [], np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        outs.append(fn(i))
        seconds[i] = time.perf_counter() - start
    return outs, seconds


def bench_small(args, rows: list) -> None:
    K, k_max, B = args.small_k, args.small_kmax, args.batch
    scores, costs = make_instances(B, K, args.small_logit_std, args.seed)
    s_t, c_t = torch.from_numpy(scores), torch.from_numpy(costs)
    n_milp, n_ref = min(args.small_milp, B), min(args.small_reference, B)
    des_numpy(scores[:8], costs[:8], 0.5, 1, k_max)  # compile / load the numba cache
    for gamma in args.small_gammas:
        setting = f"K={K} k_max={k_max} gamma={gamma}"
        res, t_des = timed(lambda: des_numpy(scores, costs, gamma, 1, k_max), args.repeats)
        energy, violation, nodes = res[1], res[2], res[4]
        _, t_api = timed(lambda: des(s_t, c_t, gamma, 1, k_max), args.repeats)
        milp_res, t_milp = timed(lambda: milp_p1(s_t[:n_milp], c_t[:n_milp], gamma, 1, k_max))
        brute, t_brute = timed(lambda: brute_force_p1(s_t, c_t, gamma, 1, k_max))
        ref, t_ref = timed(lambda: des_reference(s_t[:n_ref], c_t[:n_ref], gamma, 1, k_max))
        milp_rate = n_milp / t_milp
        feasible = ~violation
        common = dict(setting=setting, feasible_share=float(feasible.mean()))
        mean_nodes = float(nodes[feasible].mean()) if feasible.any() else 0.0
        max_nodes = int(nodes.max())
        checks = [
            ("des (numba)", B / t_des, B, mean_nodes, max_nodes, energy[:n_milp], violation[:n_milp]),
            ("des (torch API)", B / t_api, B, mean_nodes, max_nodes, None, None),
            (
                "des_reference (python)",
                n_ref / t_ref,
                n_ref,
                float(ref.nodes.double()[~ref.violation].mean()) if (~ref.violation).any() else 0.0,
                int(ref.nodes.max()),
                ref.energy.numpy()[:n_milp],
                ref.violation.numpy()[:n_milp],
            ),
            (
                "brute force (numpy)",
                B / t_brute,
                B,
                float(subset_count(K, 1, k_max)),
                subset_count(K, 1, k_max),
                brute.energy.numpy()[:n_milp],
                brute.violation.numpy()[:n_milp],
            ),
            ("milp (HiGHS)", milp_rate, n_milp, None, None, milp_res.energy.numpy(), milp_res.violation.numpy()),
        ]
        for method, rate, count, nodes_mean, nodes_max, e, v in checks:
            n_check = min(len(e), n_milp) if e is not None else 0
            bad = (
                mismatches(e[:n_check], v[:n_check], milp_res.energy.numpy()[:n_check], milp_res.violation.numpy()[:n_check])
                if n_check
                else None
            )
            rows.append(
                dict(
                    common,
                    method=method,
                    instances=count,
                    instances_per_s=rate,
                    ms_median=1e3 / rate,
                    ms_worst=None,
                    speedup_vs_milp=rate / milp_rate,
                    nodes_mean=nodes_mean,
                    nodes_max=nodes_max,
                    brute_force_subsets=subset_count(K, 1, k_max),
                    mismatches_vs_milp=bad,
                    checked_vs_milp=n_check,
                )
            )
        # brute force is exact too: DES must agree with it on the whole batch
        rows[-5]["mismatches_vs_brute_force"] = mismatches(energy, violation, brute.energy.numpy(), brute.violation.numpy())


def bench_large(args, rows: list) -> None:
    K, k_max, n = args.large_k, args.large_kmax, args.large_instances
    scores, costs = make_instances(n, K, args.large_logit_std, args.seed + 1)
    n_milp = min(args.large_milp, n)
    s_t, c_t = torch.from_numpy(scores), torch.from_numpy(costs)
    des_numpy(scores[:1], costs[:1], 0.5, 1, k_max)
    subsets = subset_count(K, 1, k_max)
    for gamma in args.large_gammas:
        setting = f"K={K} k_max={k_max} gamma={gamma}"
        outs, t_des = per_instance_times(lambda i: des_numpy(scores[i : i + 1], costs[i : i + 1], gamma, 1, k_max), n)
        energy = np.array([o[1][0] for o in outs])
        violation = np.array([o[2][0] for o in outs])
        nodes = np.array([o[4][0] for o in outs])
        batch_res, t_batch = timed(lambda: des_numpy(scores, costs, gamma, 1, k_max), args.repeats)
        milp_outs, t_milp = per_instance_times(lambda i: milp_p1(s_t[i : i + 1], c_t[i : i + 1], gamma, 1, k_max), n_milp)
        milp_energy = np.array([o.energy.item() for o in milp_outs])
        milp_violation = np.array([o.violation.item() for o in milp_outs])
        feasible = ~violation
        common = dict(setting=setting, feasible_share=float(feasible.mean()), brute_force_subsets=subsets)
        milp_median = float(np.median(t_milp))
        rows.append(
            dict(
                common,
                method="des (numba), one at a time",
                instances=n,
                instances_per_s=1.0 / float(np.mean(t_des)),
                ms_median=1e3 * float(np.median(t_des)),
                ms_worst=1e3 * float(np.max(t_des)),
                ms_median_feasible=1e3 * float(np.median(t_des[feasible])) if feasible.any() else None,
                speedup_vs_milp=milp_median / float(np.median(t_des)),
                nodes_mean=float(nodes[feasible].mean()) if feasible.any() else 0.0,
                nodes_max=int(nodes.max()),
                mismatches_vs_milp=mismatches(energy[:n_milp], violation[:n_milp], milp_energy, milp_violation),
                checked_vs_milp=n_milp,
                mismatches_batch_vs_single=mismatches(batch_res[1], batch_res[2], energy, violation),
            )
        )
        rows.append(
            dict(
                common,
                method="des (numba), batch",
                instances=n,
                instances_per_s=n / t_batch,
                ms_median=1e3 * t_batch / n,
                ms_worst=None,
                speedup_vs_milp=milp_median / (t_batch / n),
                nodes_mean=None,
                nodes_max=None,
                mismatches_vs_milp=None,
                checked_vs_milp=0,
            )
        )
        rows.append(
            dict(
                common,
                method="milp (HiGHS)",
                instances=n_milp,
                instances_per_s=1.0 / float(np.mean(t_milp)),
                ms_median=1e3 * milp_median,
                ms_worst=1e3 * float(np.max(t_milp)),
                speedup_vs_milp=1.0,
                nodes_mean=None,
                nodes_max=None,
                mismatches_vs_milp=0,
                checked_vs_milp=n_milp,
            )
        )


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(rows: list) -> None:
    header = (
        f"{'setting':<28} {'method':<28} {'feas':>5} {'inst/s':>10} {'ms med':>9} {'ms worst':>9} {'x milp':>8} "
        f"{'nodes mean':>10} {'nodes max':>9} {'brute subsets':>13} {'mismatch':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        mism = "-" if r["mismatches_vs_milp"] is None else f"{r['mismatches_vs_milp']}/{r['checked_vs_milp']}"
        print(
            f"{r['setting']:<28} {r['method']:<28} {r['feasible_share']:>5.2f} {fmt(r['instances_per_s'], ',.0f'):>10} "
            f"{fmt(r['ms_median'], '.4f'):>9} {fmt(r['ms_worst'], '.3f'):>9} {fmt(r['speedup_vs_milp'], ',.0f'):>8} "
            f"{fmt(r['nodes_mean'], '.1f'):>10} {fmt(r['nodes_max'], 'd'):>9} {r['brute_force_subsets']:>13.3g} {mism:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="instances per batch in the small setting")
    parser.add_argument("--small-k", type=int, default=16)
    parser.add_argument("--small-kmax", type=int, default=4)
    parser.add_argument("--small-gammas", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--small-logit-std", type=float, default=2.0, help="gate logits ~ N(0, std^2)")
    parser.add_argument("--small-milp", type=int, default=400, help="instances solved by MILP per gamma (small)")
    parser.add_argument("--small-reference", type=int, default=300, help="instances solved by des_reference per gamma")
    parser.add_argument("--large-k", type=int, default=1024)
    parser.add_argument("--large-kmax", type=int, default=8)
    parser.add_argument("--large-gammas", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--large-logit-std", type=float, default=3.0)
    parser.add_argument("--large-instances", type=int, default=100)
    parser.add_argument("--large-milp", type=int, default=20, help="instances solved by MILP per gamma (large, ~0.5 s each)")
    parser.add_argument("--repeats", type=int, default=3, help="batch timings keep the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows: list = []
    bench_small(args, rows)
    bench_large(args, rows)
    print_table(rows)
    brute_checks = [(r["setting"], r["mismatches_vs_brute_force"]) for r in rows if "mismatches_vs_brute_force" in r]
    print(
        "\nDES vs brute force on every instance of the small batches: "
        + ", ".join(f"{s}: {m} mismatches" for s, m in brute_checks)
    )
    total = time.perf_counter() - start
    print(f"\n{total:.1f} s total; one thread (numba, torch, BLAS); speed-up = MILP time / method time")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        benchmark="des",
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        machine=dict(platform=platform.platform(), processor=platform.processor(), python=platform.python_version()),
        seconds=total,
        rows=rows,
    )
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(payload, tmp, indent=2)
    os.replace(tmp.name, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
