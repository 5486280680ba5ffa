"""Solver threads: DES and JESA rows/s on 1 vs 2 threads for one token-level MoE layer.

One routing call of a token-level model: B = 12,544 rows (256 images x 49 tokens), K = 8
experts, N = 16 subcarriers.  Scores are softmax(normal logits * 3); link costs come from
WirelessChannel with the default ChannelConfig and d_model = 64.  DES routes on the static
plan (expert k on subcarrier k mod N), JESA on every link; k_min = 1, k_max = K.  Runs of
1 and 2 threads alternate (best of --repeats each) so that a change in machine load hits
both; the results are checked to be bit-identical.  Run it when the machine is otherwise
idle: the load average is printed and saved with the figures.

    python benchmarks/bench_parallel.py [--rows 12544] [--repeats 5] [--threads 1 2]

Prints one table and writes benchmarks/results/parallel.json.
"""

from __future__ import annotations

import argparse
import os

# numba sizes its thread pool at import: one thread per CPU; each run then picks its count
os.environ["NUMBA_NUM_THREADS"] = str(os.cpu_count())
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch only builds the instances here

import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.selection.des import des_numpy  # noqa: E402
from dmoe_torch.selection.jesa import jesa_numpy  # noqa: E402
from dmoe_torch.utils import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "parallel.json"
K, N = 8, 16


def make_instances(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scores [B, K], link costs [B, K, N] J, static-plan costs [B, K] J."""
    channel = WirelessChannel(ChannelConfig(), K, d_model=64, seed=seed)
    costs = np.ascontiguousarray(channel.costs(torch.arange(rows), layer=0, stream=0).numpy())
    assert costs.shape == (rows, K, N), costs.shape
    logits = np.random.default_rng(seed).normal(size=(rows, K)) * 3.0
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    experts = np.arange(K)
    static = np.ascontiguousarray(costs[:, experts, experts % N])
    return scores, costs, static


def best_times(solve, threads: list[int], repeats: int) -> tuple[dict[int, float], dict[int, tuple]]:
    """Best wall time of solve(num_threads) per thread count, runs interleaved; last outputs."""
    best = {t: np.inf for t in threads}
    outputs = {}
    for _ in range(repeats):
        for t in threads:
            start = time.perf_counter()
            outputs[t] = solve(t)
            best[t] = min(best[t], time.perf_counter() - start)
    return best, outputs


def identical(a: tuple, b: tuple) -> bool:
    return all(np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes() for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12_544, help="rows per call (B*T tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method and thread count (best kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts; the first is the reference")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not all(1 <= t <= os.cpu_count() for t in args.threads):
        parser.error(f"--threads must be between 1 and the {os.cpu_count()} CPUs, got {args.threads}")

    scores, costs, static = make_instances(args.rows, args.seed)
    solvers = {
        "des": lambda gamma, t: des_numpy(scores, static, gamma, 1, K, num_threads=t),
        "jesa": lambda gamma, t: tuple(jesa_numpy(scores, costs, gamma, 1, K, num_threads=t)),
    }
    for solve in solvers.values():  # compile / load the numba cache outside the timing
        for t in args.threads:
            solve(0.9, t)
    load_before = os.getloadavg()
    rows = []
    for name, solve in solvers.items():
        for gamma in args.gammas:
            times, outputs = best_times(lambda t: solve(gamma, t), args.threads, args.repeats)
            ref = args.threads[0]
            row = dict(method=name, gamma=gamma, rows=args.rows)
            for t in args.threads:
                row[f"rows_per_s_{t}"] = args.rows / times[t]
                row[f"ms_{t}"] = 1e3 * times[t]
            for t in args.threads[1:]:
                row[f"speedup_{t}"] = times[ref] / times[t]
                row[f"identical_{t}"] = identical(outputs[ref], outputs[t])
            rows.append(row)
    load_after = os.getloadavg()

    header = f"{'method':6} {'gamma':>5} " + " ".join(f"{f'{t} thr rows/s':>15}" for t in args.threads)
    header += " " + " ".join(f"{f'x{t}':>6} {'same':>5}" for t in args.threads[1:])
    print(header)
    for row in rows:
        line = f"{row['method']:6} {row['gamma']:5.2f} " + " ".join(f"{row[f'rows_per_s_{t}']:15,.0f}" for t in args.threads)
        line += " " + " ".join(f"{row[f'speedup_{t}']:6.2f} {str(row[f'identical_{t}']):>5}" for t in args.threads[1:])
        print(line)
    print(
        f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs; "
        f"numba threading layer {numba.threading_layer()}"
    )
    atomic_write_json(
        RESULTS,
        dict(
            benchmark="parallel",
            settings=dict(
                rows=args.rows,
                experts=K,
                subcarriers=N,
                d_model=64,
                logit_scale=3.0,
                k_min=1,
                k_max=K,
                gammas=args.gammas,
                threads=args.threads,
                repeats=args.repeats,
                seed=args.seed,
            ),
            machine=dict(
                cpus=os.cpu_count(),
                processor=platform.processor() or platform.machine(),
                numba_threading_layer=numba.threading_layer(),
                load_average_before=list(load_before),
                load_average_after=list(load_after),
            ),
            results=rows,
        ),
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
