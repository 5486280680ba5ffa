"""Router cost inside one MoE layer: route() of each policy against the top-2 layer step.

One MoE layer of the default model's size: 12,544 token rows (256 images x 49 tokens),
d_model 64, K = 8 experts, N = 16 subcarriers, the channel's real per-link energies.  Timed
in one process, interleaved over repetitions:

* the layer step: forward (gate, routing, dispatch, experts, combine) + backward, top-2;
* route() alone for topk@2, des / jesa / optimal / greedy at gamma 0.25 (k_max 2),
  lagrangian, and des / jesa pinned to two experts (k_min = k_max = 2); the exact policies
  run their default path (on the CPU for k_max <= 2: des the numba enumeration des_small,
  jesa its numba row kernel, both in small_sets.py; optimal / greedy / lagrangian the torch
  enumeration; topk's Selection one numba pass, static_kernels.py)
  and, for comparison, the "numba" rows: the general CPU solvers, des by its branch and
  bound and jesa by its batched steps (one numba pass per step and round, DES by branch and
  bound) (``--no-numba`` skips those rows);
* the layer step routed by des / jesa pinned to two experts (the same expert work as top-2).

Target (issue: the router on the model's device): each router <= 5% of the top-2 layer
step on one thread; a des / jesa =2 step <= 1.05x the top-2 step.

    python benchmarks/bench_layer.py [--threads 1] [--reps 5] [--device cpu|cuda] [--no-numba]

Prints the table (ms and share of the top-2 layer step side by side) and writes
benchmarks/results/layer.json (benchmarks/results/layer_<device>.json off the CPU).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from unittest import mock

import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.moe import MoELayer, RouterSpec
from dmoe_torch.selection import registry, route
from dmoe_torch.utils import atomic_write_json, machine_facts

jesa_module = importlib.import_module("dmoe_torch.selection.jesa")  # the package's `jesa` is the function
ROWS, D, K, N = 256 * 49, 64, 8, 16
GAMMA = dict(gamma=0.25, k_max=2)
PINNED = dict(gamma=0.01, k_min=2, k_max=2)  # any pair reaches gamma: exactly two experts, as top-2
# (label, policy, parameters, solver): "torch" = the default path, "numba" = the CPU solvers
ROUTES = [
    ("topk@2", "topk", dict(k=2), "torch"),
    ("des 0.25", "des", GAMMA, "torch"),
    ("jesa 0.25", "jesa", GAMMA, "torch"),
    ("optimal 0.25", "optimal", GAMMA, "torch"),
    ("greedy 0.25", "greedy", GAMMA, "torch"),
    ("lagrangian 1e4", "lagrangian", dict(lam=1e4, k_max=2), "torch"),
    ("des =2", "des", PINNED, "torch"),
    ("jesa =2", "jesa", PINNED, "torch"),
    ("des 0.25 numba", "des", GAMMA, "numba"),
    ("jesa 0.25 numba", "jesa", GAMMA, "numba"),
]
STEPS = [("step topk@2", "topk", dict(k=2)), ("step des =2", "des", PINNED), ("step jesa =2", "jesa", PINNED)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-numba", action="store_true", help="skip the numba rows (the solvers before)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    channel = WirelessChannel(ChannelConfig(), num_devices=K, d_model=D, seed=0)
    costs = channel.costs(torch.arange(ROWS), layer=0, stream=0)  # [ROWS, K, N] J, CPU float64 as the layer gets them
    layer = MoELayer(D, K, hidden_mult=2, link_dropout=0.3).to(device).train()
    h = torch.randn(ROWS, D, device=device)
    with torch.no_grad():  # a trained gate's sharpness: scale the logits up
        layer.gate.weight.mul_(8.0)
    scores = torch.softmax(layer.gate(h), dim=-1).detach()
    routes = [r for r in ROUTES if not (args.no_numba and r[3] == "numba")]

    def route_once(policy, params, solver):
        if solver == "numba":
            with (
                mock.patch.object(registry, "enumerable", lambda *a: False),
                mock.patch.object(registry, "SMALL_SET_SIZE", 0),
                mock.patch.object(jesa_module, "SMALL_SET_SIZE", 0),
            ):
                return route(policy, scores, costs, failure_energy=channel.failure_energy_j, check_values=False, **params)
        return route(policy, scores, costs, failure_energy=channel.failure_energy_j, check_values=False, **params)

    def step_once(policy, params):
        layer.zero_grad(set_to_none=True)
        spec = RouterSpec(policy, failure_energy=channel.failure_energy_j, **params)
        out = layer(h, costs, spec, generator=torch.Generator().manual_seed(0))
        (out.out.square().mean() + 0.01 * out.aux_loss).backward()

    for _label, policy, params, solver in routes:  # warm-up: numba compiles, caches fill
        route_once(policy, params, solver)
    for _, policy, params in STEPS:
        step_once(policy, params)
    samples: dict[str, list[float]] = {label: [] for label, *_ in routes + STEPS}
    for _ in range(args.reps):
        for label, policy, params, solver in routes:
            samples[label].append(timed(lambda: route_once(policy, params, solver), device))
        for label, policy, params in STEPS:
            samples[label].append(timed(lambda: step_once(policy, params), device))
    ms = {label: statistics.median(values) * 1e3 for label, values in samples.items()}
    base = ms["step topk@2"]

    print(
        f"one MoE layer: {ROWS} rows, d {D}, K {K}, N {N}, {args.threads} thread(s), {device}; median of {args.reps} repetitions"
    )
    print(f"{'what':<18} {'ms':>9} {'/ top-2 layer step':>19}")
    rows = []
    for label in samples:
        print(f"{label:<18} {ms[label]:9.2f} {ms[label] / base:19.3f}")
        rows.append(dict(label=label, ms=ms[label], ratio_vs_topk_layer_step=ms[label] / base))
    result = dict(
        benchmark="moe_layer_router",
        machine=machine_facts(
            threads=args.threads,
            device=str(device),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        ),
        rows_per_layer=ROWS,
        d_model=D,
        num_experts=K,
        num_subcarriers=N,
        reps=args.reps,
        results=rows,
    )
    out = args.out or (
        "benchmarks/results/layer.json" if device.type == "cpu" else f"benchmarks/results/layer_{device.type}.json"
    )
    print(f"wrote {atomic_write_json(out, result)}")


if __name__ == "__main__":
    main()
