"""Enumeration solvers (selection/enumerate.py): exactness at scale, and speed against numba.

Part 1, exactness.  Seeded random groups of rows (K in 2..16, N in k_min..32, k_max in 1..3,
k_min, gamma, tie kind, outage rate all drawn per group; scores: Dirichlet with zeros and
one-hot rows, or small integers for tied scores; costs: lognormal J, or small integers for
tied costs; +inf on links, whole experts and whole rows).  Counted per solver: rows whose
energy differs beyond 1e-9 relative, whose violation / dropped differ, and (on rows without
cost ties, where every optimum is unique) whose set or subcarriers differ:
des_enumerate vs des_numpy (P1 under c*), jesa_enumerate vs jesa_numpy, optimal_enumerate
vs brute_force_p2 (groups with K, N <= 6) and vs milp_p2 (the first rows of every group).
Then, since the P2 optimum is now cheap, JESA's gap to it on every row where both are
feasible: the share of rows above the optimum, the mean and largest relative gap.

Part 2, speed.  12,544 rows (256 images x 49 tokens), gamma = 0.25, scores the softmax of
N(0, 2^2) logits, lognormal link costs with 3% outages; one thread (torch and numba).  Best
of several runs of des_numpy / jesa_numpy (numba) and des_enumerate / jesa_enumerate /
optimal_enumerate, for (K, N, k_max) from (8, 16, 2) up to (32, 32, 3) to locate the
crossover in the number of candidate sets C; milp_p2 (the optimal policy today) is timed on a
few rows and scaled.  Also JESA's CPU row compaction against the device path (all rows,
frozen by torch.where).  With --device cuda the enumeration runs on the GPU and numba's time
includes the copies there and back (the router's alternative), and the solvers are checked
under torch.cuda.set_sync_debug_mode("error") and against their CPU results.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_enumerate.py           # both parts
    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_enumerate.py --quick   # smoke run
    python benchmarks/bench_enumerate.py --part speed --device cuda                      # on a GPU

Writes benchmarks/results/enumerate.json (updating only the sections it ran).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # one core: the figures are single-threaded

from dmoe_torch.selection import enumerate as enum  # noqa: E402
from dmoe_torch.selection.des import des_numpy  # noqa: E402
from dmoe_torch.selection.enumerate import (  # noqa: E402
    candidate_set_count,
    des_enumerate,
    jesa_enumerate,
    optimal_enumerate,
)
from dmoe_torch.selection.exact import brute_force_p2, milp_p2  # noqa: E402
from dmoe_torch.selection.jesa import jesa_numpy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "enumerate.json"
RTOL = 1e-9  # energies "equal" within this relative tolerance
TIE_KINDS = ("none", "scores", "costs")


# --------------------------------------------------------------------------------------
# part 1: exactness
# --------------------------------------------------------------------------------------
def draw_group(rng: np.random.Generator, rows: int):
    """One group's config and instances: scores [rows, K], costs [rows, K, N] J."""
    K = int(rng.integers(2, 17))
    k_max = int(rng.integers(1, min(K, 3) + 1))
    k_min = int(rng.integers(1, k_max + 1))
    N = int(rng.integers(k_min, 33)) if rng.random() < 0.5 else int(rng.integers(k_min, max(k_min, 4) + 1))
    gamma = 1.0 if rng.random() < 0.1 else float(rng.uniform(0.05, 1.0))
    ties = TIE_KINDS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    outage = float(rng.choice([0.0, 0.05, 0.2, 0.5]))
    if ties == "scores":
        scores = rng.integers(0, 4, (rows, K)).astype(np.float64)
    else:
        scores = rng.dirichlet(np.full(K, 0.6), rows)
        scores[rng.random((rows, K)) < 0.1] = 0.0
        one_hot = rng.random(rows) < 0.05
        scores[one_hot] = np.eye(K)[rng.integers(K, size=one_hot.sum())]
    scores[scores.sum(1) == 0, 0] = 1.0
    scores /= scores.sum(1, keepdims=True)
    shape = (rows, K, N)
    costs = rng.integers(1, 4, shape).astype(np.float64) if ties == "costs" else rng.lognormal(0.0, 1.0, shape)
    costs[rng.random(shape) < outage] = np.inf
    costs[rng.random((rows, K)) < outage / 2] = np.inf
    costs[rng.random(rows) < 0.02] = np.inf
    return dict(K=K, N=N, k_min=k_min, k_max=k_max, gamma=gamma, ties=ties), scores, costs


def energy_differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same = np.isclose(a, b, rtol=RTOL, atol=0.0) | (np.isinf(a) & np.isinf(b))
    return ~same


def rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).reshape(a.shape[0], -1).any(1)


ROUTER_CASES = ((8, 16, 2), (8, 16, 3), (16, 16, 3))


def gap_summary(gaps: np.ndarray) -> dict:
    """JESA's relative gaps to the P2 optimum (0 within RTOL) -> share above, mean, largest."""
    positive = gaps[gaps > 0]
    return {
        "rows_both_feasible": int(gaps.size),
        "share_above_optimum": float(positive.size / max(gaps.size, 1)),
        "mean_relative_gap": float(gaps.mean()) if gaps.size else math.nan,
        "mean_relative_gap_where_above": float(positive.mean()) if positive.size else 0.0,
        "max_relative_gap": float(gaps.max()) if gaps.size else math.nan,
    }


def relative_gaps(jesa_result, optimum) -> np.ndarray:
    """(JESA - optimum) / optimum on the rows where both are feasible, 0 within RTOL."""
    both = (~jesa_result.violation & ~optimum.violation).numpy()
    j, o = jesa_result.energy.numpy()[both], optimum.energy.numpy()[both]
    gap = (j - o) / np.maximum(o, 1e-300)
    return np.where(np.abs(gap) <= RTOL, 0.0, gap)


def router_gap(K: int, N: int, k_max: int, rows: int, seed: int) -> dict:
    """JESA's gap on the speed part's router-like instances (gamma = 0.25, 3% outages)."""
    s, e = (torch.from_numpy(a) for a in speed_instances(K, N, rows, seed))
    return gap_summary(relative_gaps(jesa_enumerate(s, e, 0.25, 1, k_max), optimal_enumerate(s, e, 0.25, 1, k_max)))


def exactness(groups: int, rows: int, milp_rows: int, router_rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}

    def add(name: str, value) -> None:
        counts[name] = counts.get(name, 0) + int(np.sum(value))

    gaps = []
    started = time.perf_counter()
    for g in range(groups):
        cfg, s, e = draw_group(rng, rows)
        K, N, k_min, k_max, gamma = cfg["K"], cfg["N"], cfg["k_min"], cfg["k_max"], cfg["gamma"]
        tie_free = cfg["ties"] != "costs"
        st, et = torch.from_numpy(s), torch.from_numpy(e)
        add("instances", rows)
        add(f"instances_ties_{cfg['ties']}", rows)
        # P1 on c* (every expert on its best subcarrier)
        c = e.min(2)
        mask, energy, violation, dropped, _, _ = des_numpy(s, c, gamma, k_min, k_max)
        d = des_enumerate(st, torch.from_numpy(c), gamma, k_min, k_max)
        add("des_energy_mismatch", energy_differs(d.energy.numpy(), energy))
        add("des_flag_mismatch", (d.violation.numpy() != violation) | (d.dropped.numpy() != dropped))
        if tie_free:
            add("des_tie_free_rows", rows)
            add("des_set_mismatch_tie_free", rows_differ(d.mask.numpy(), mask))
        add("des_infeasible_rows", violation)
        # JESA
        ref = jesa_numpy(s, e, gamma, k_min, k_max)
        j = jesa_enumerate(st, et, gamma, k_min, k_max)
        energy_bad = energy_differs(j.energy.numpy(), ref.energy)
        flags_bad = (j.violation.numpy() != ref.violation) | (j.dropped.numpy() != ref.dropped)
        if tie_free:
            add("jesa_tie_free_rows", rows)
            add("jesa_energy_mismatch_tie_free", energy_bad)
            add("jesa_flag_mismatch_tie_free", flags_bad | (j.certified.numpy() != ref.certified))
            set_bad = rows_differ(j.mask.numpy(), ref.mask) | rows_differ(j.subcarrier.numpy(), ref.subcarrier)
            add("jesa_set_mismatch_tie_free", set_bad)
        else:
            add("jesa_cost_tie_rows", rows)
            add("jesa_energy_mismatch_cost_ties", energy_bad)
            add("jesa_flag_mismatch_cost_ties", flags_bad)
        add("jesa_iterated_rows", ref.iterations > 1)
        add("jesa_infeasible_rows", ref.violation)
        # exact P2, and JESA's gap to it
        o = optimal_enumerate(st, et, gamma, k_min, k_max)
        o_feasible = ~o.violation.numpy()
        add("optimal_infeasible_rows", ~o_feasible)
        j_feasible = ~j.violation.numpy()
        add("jesa_feasible_where_p2_infeasible", j_feasible & ~o_feasible)
        both = j_feasible & o_feasible
        gap = relative_gaps(j, o)
        add("jesa_below_optimum", gap < 0)
        add("jesa_certified_above_optimum", j.certified.numpy()[both] & (gap > 0))
        gaps.append(gap)
        if K <= 6 and N <= 6:
            ref_p2 = brute_force_p2(st, et, gamma, k_min, k_max)
            add("brute_force_rows", rows)
            compare_p2(add, "brute_force", o, ref_p2, tie_free)
        take = slice(0, milp_rows)
        ref_p2 = milp_p2(st[take], et[take], gamma, k_min, k_max)
        o_take = optimal_enumerate(st[take], et[take], gamma, k_min, k_max)
        add("milp_rows", min(rows, milp_rows))
        compare_p2(add, "milp", o_take, ref_p2, tie_free)
        if (g + 1) % 50 == 0:
            print(f"  {g + 1}/{groups} groups, {time.perf_counter() - started:.0f} s", flush=True)
    counts["jesa_gap"] = gap_summary(np.concatenate(gaps))
    counts["jesa_gap_router_like"] = {
        f"K={K} N={N} k_max={k_max}": router_gap(K, N, k_max, router_rows, seed) for K, N, k_max in ROUTER_CASES
    }
    counts["seconds"] = round(time.perf_counter() - started, 1)
    return counts


def compare_p2(add, name: str, result, reference, tie_free: bool) -> None:
    add(f"{name}_energy_mismatch", energy_differs(result.energy.numpy(), reference.energy.numpy()))
    flags = [(getattr(result, f) != getattr(reference, f)).numpy() for f in ("violation", "dropped", "certified")]
    add(f"{name}_flag_mismatch", np.logical_or.reduce(flags))
    if tie_free:
        add(f"{name}_tie_free_rows", result.mask.shape[0])
        differ = rows_differ(result.mask.numpy(), reference.mask.numpy())
        differ |= rows_differ(result.subcarrier.numpy(), reference.subcarrier.numpy())
        add(f"{name}_set_mismatch_tie_free", differ)


# --------------------------------------------------------------------------------------
# part 2: speed
# --------------------------------------------------------------------------------------
SPEED_CASES = ((8, 16, 2), (8, 16, 3), (12, 16, 3), (16, 16, 2), (16, 16, 3), (32, 32, 2), (32, 32, 3))


def speed_instances(K: int, N: int, B: int, seed: int):
    rng = np.random.default_rng([seed, K, N])
    logits = rng.normal(0.0, 2.0, (B, K))
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    costs = rng.lognormal(0.0, 1.0, (B, K, N)) * 1e-6  # J
    costs[rng.random((B, K, N)) < 0.03] = np.inf
    return scores, costs


def best_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: numba compilation, cached tables
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def graph_time(fn, repeats: int) -> float | str:
    """Best replay time of `fn` captured in a CUDA graph (possible because the solvers never
    sync); the replay must reproduce the eager result.  The error text if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = fn()  # warm-up on a side stream, as torch.cuda.graph requires
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
        graph.replay()
        torch.cuda.synchronize()
        if not (torch.equal(captured.mask, eager.mask) and torch.equal(captured.energy, eager.energy)):
            return "replay differs from the eager result"
        return best_time(graph.replay, repeats, torch.device("cuda"))
    except RuntimeError as error:
        return f"capture failed: {error}"[:300]


def numba_on(device: torch.device, solver):
    """numba as the router would call it from `device`: copy there, solve, copy back."""

    def run(*tensors):
        arrays = [t.cpu().numpy() for t in tensors]
        out = solver(*arrays)
        return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in out[:3]]

    return run


def time_case(K: int, N: int, k_max: int, rows: int, repeats: int, device: torch.device, seed: int, gamma: float) -> dict:
    """One (K, N, k_max) line of the speed table; times in seconds (best of `repeats`)."""
    s, e = speed_instances(K, N, rows, seed)
    c = e.min(2)
    st, et, ct = (torch.from_numpy(a).to(device) for a in (s, e, c))
    des_nb = numba_on(device, lambda s_, c_: des_numpy(s_, c_, gamma, 1, k_max, num_threads=1))
    jesa_nb = numba_on(device, lambda s_, e_: jesa_numpy(s_, e_, gamma, 1, k_max, num_threads=1))

    def jesa_enum():
        return jesa_enumerate(st, et, gamma, 1, k_max)

    row = {
        "K": K,
        "N": N,
        "k_max": k_max,
        "candidate_sets": candidate_set_count(K, 1, k_max),
        "rows": rows,
        "des_numba_s": best_time(lambda: des_nb(st, ct), repeats, device),
        "des_enumerate_s": best_time(lambda: des_enumerate(st, ct, gamma, 1, k_max), repeats, device),
        "jesa_numba_s": best_time(lambda: jesa_nb(st, et), repeats, device),
        "jesa_enumerate_s": best_time(jesa_enum, repeats, device),
    }
    if K <= 16:
        optimal_repeats = 1 if device.type == "cpu" else repeats
        row["optimal_enumerate_s"] = best_time(lambda: optimal_enumerate(st, et, gamma, 1, k_max), optimal_repeats, device)
    if device.type == "cpu" and K <= 16:
        few = 40
        start = time.perf_counter()
        milp_p2(st[:few], et[:few], gamma, 1, k_max)
        row["optimal_milp_s_scaled"] = (time.perf_counter() - start) * rows / few
    if device.type == "cpu" and K == 8:
        saved = enum._active_rows
        enum._active_rows = lambda active: None  # the device path: every row, frozen by torch.where
        try:
            row["jesa_enumerate_no_compaction_s"] = best_time(jesa_enum, repeats, device)
        finally:
            enum._active_rows = saved
    if device.type == "cuda":
        row["des_enumerate_graph_s"] = graph_time(lambda: des_enumerate(st, ct, gamma, 1, k_max), repeats)
        row["jesa_enumerate_graph_s"] = graph_time(jesa_enum, repeats)
        if K <= 16:
            row["optimal_enumerate_graph_s"] = graph_time(lambda: optimal_enumerate(st, et, gamma, 1, k_max), repeats)
    row["des_ratio_enum_over_numba"] = row["des_enumerate_s"] / row["des_numba_s"]
    row["jesa_ratio_enum_over_numba"] = row["jesa_enumerate_s"] / row["jesa_numba_s"]
    return row


def speed(rows: int, repeats: int, device: torch.device, seed: int) -> dict:
    gamma = 0.25
    table = []
    for K, N, k_max in SPEED_CASES:
        table.append(time_case(K, N, k_max, rows, repeats, device, seed, gamma))
        print_speed_row(table[-1])
    result = {"device": str(device), "cpu": cpu_model(), "gamma": gamma, "table": table}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["device_checks"] = device_checks(device, seed)
    return result


def cpu_model() -> str:
    """The CPU's model name (numba and the CPU figures run there), or the platform's word."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_speed_row(row: dict) -> None:
    opt = row.get("optimal_enumerate_s", math.nan)
    milp = row.get("optimal_milp_s_scaled", math.nan)
    frozen = row.get("jesa_enumerate_no_compaction_s", math.nan)
    graphs = {k: row[k] for k in ("des_enumerate_graph_s", "jesa_enumerate_graph_s", "optimal_enumerate_graph_s") if k in row}
    ms = {name: row[name] * 1e3 for name in ("des_numba_s", "des_enumerate_s", "jesa_numba_s", "jesa_enumerate_s")}
    print(
        f"K={row['K']:>2} N={row['N']:>2} k_max={row['k_max']} C={row['candidate_sets']:>5} | "
        f"DES numba {ms['des_numba_s']:8.1f} ms  enum {ms['des_enumerate_s']:8.1f} ms  "
        f"x{row['des_ratio_enum_over_numba']:5.2f} | "
        f"JESA numba {ms['jesa_numba_s']:8.1f} ms  enum {ms['jesa_enumerate_s']:8.1f} ms  "
        f"x{row['jesa_ratio_enum_over_numba']:5.2f}  (no compaction {frozen * 1e3:7.1f} ms) | "
        f"optimal enum {opt * 1e3:9.1f} ms  MILP {milp:8.1f} s",
        flush=True,
    )
    if graphs:
        print(
            "    CUDA graph replay: "
            + "  ".join(f"{k.split('_')[0]} " + (f"{v * 1e3:.2f} ms" if isinstance(v, float) else v) for k, v in graphs.items()),
            flush=True,
        )


def device_checks(device: torch.device, seed: int) -> dict:
    """The solvers on `device`: no host sync after a warm-up call, same answers as on the CPU."""
    checks = {}
    s, e = speed_instances(8, 16, 2048, seed + 1)
    e[:, :, :2] = np.inf  # collisions and outages: every phase of JESA runs
    cpu = (torch.from_numpy(s), torch.from_numpy(e))
    dev = tuple(t.to(device) for t in cpu)
    for k_max in (2, 3):
        solvers = {
            "des": lambda a, b, k=k_max: des_enumerate(a, b.amin(2), 0.5, 1, k),
            "optimal": lambda a, b, k=k_max: optimal_enumerate(a, b, 0.5, 1, k),
            "jesa": lambda a, b, k=k_max: jesa_enumerate(a, b, 0.5, 1, k),
        }
        for name, solver in solvers.items():
            key = f"{name}_k{k_max}"
            solver(*dev)  # warm-up: the constant tables reach the device once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                on_device = solver(*dev)
                checks[f"{key}_sync_free"] = True
            except RuntimeError as error:
                checks[f"{key}_sync_free"] = str(error)[:300]
                on_device = None
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if on_device is None:
                on_device = solver(*dev)
            reference = solver(*cpu)
            same = all(
                torch.equal(getattr(on_device, f).cpu(), getattr(reference, f))
                for f in ("mask", "subcarrier", "violation", "dropped", "certified")
            )
            same &= bool(torch.allclose(on_device.energy.cpu(), reference.energy, rtol=RTOL, atol=0.0))
            checks[f"{key}_matches_cpu"] = same
            print(f"  {key}: sync free {checks[f'{key}_sync_free']}, matches CPU {same}", flush=True)
    return checks


# --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "exactness", "speed"), default="all")
    parser.add_argument("--device", default="cpu", help="where the enumeration runs in part 2 (cpu or cuda)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few groups, small batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help=f"JSON to update (default {RESULTS}; --quick: none)")
    args = parser.parse_args()
    device = torch.device(args.device)
    output = args.output or (None if args.quick else RESULTS)
    results = json.loads(output.read_text()) if output is not None and output.exists() else {}
    if args.part in ("all", "exactness"):
        groups, rows, milp_rows, router_rows = (12, 50, 5, 512) if args.quick else (420, 250, 8, 12_544)
        print(f"part 1: exactness on {groups * rows} instances")
        counts = exactness(groups, rows, milp_rows, router_rows, args.seed)
        for name, value in counts.items():
            print(f"  {name:40s} {value}")
        results["exactness"] = {"groups": groups, "rows_per_group": rows, "seed": args.seed, **counts}
    if args.part in ("all", "speed"):
        rows, repeats = (1024, 2) if args.quick else (12_544, 5)
        print(f"part 2: speed, {rows} rows, one thread, enumeration on {device}")
        results[f"speed_{device.type}"] = speed(rows, repeats, device, args.seed)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
