"""Router overhead: one training step of the default model with des / jesa routing vs topk.

Issue 4 target: a step (batch 256, K = 8 experts, two MoE layers) with des or jesa routing
takes at most 1.15x the step with topk.  Also reports the routing call alone per layer.

    python benchmarks/bench_router.py [--batch 256] [--steps 30] [--threads 2] [--device cpu]

Prints a table with ratios vs topk and writes benchmarks/results/router.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.models import DMoEClassifier
from dmoe_torch.moe import RouterSpec
from dmoe_torch.selection import route

# (label, policy, router parameters).  The "=2" rows pin des / jesa to exactly two experts
# (k_min = k_max = 2, a target any pair meets), so they run the same expert compute as top-2
# and the ratio isolates the router's own overhead.  The gamma rows show the realistic cost
# on this untrained gate, whose near-uniform scores need many experts to reach gamma.
POLICIES = [
    ("topk", "topk", dict(k=2)),
    ("des =2", "des", dict(gamma=0.01, k_min=2, k_max=2)),
    ("jesa =2", "jesa", dict(gamma=0.01, k_min=2, k_max=2)),
    ("des 0.9", "des", dict(gamma=0.9)),
    ("jesa 0.9", "jesa", dict(gamma=0.9)),
    ("dense", "dense", {}),
]


def time_training_steps(policy: str, params: dict, args, channel: WirelessChannel) -> tuple[list[float], list[float], list[float]]:
    """Per timed step: step seconds, routing seconds (both layers), experts per input."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DMoEClassifier(1, 10, 28, d_model=128, num_experts=8, num_moe_layers=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spec = RouterSpec(policy=policy, failure_energy=channel.failure_energy_j, **params)
    specs = [spec, spec]
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    step_times, route_times, experts = [], [], []
    for step in range(args.warmup + args.steps):
        ids = torch.arange(step * args.batch, (step + 1) * args.batch)
        costs = [channel.costs(ids, layer, stream=0) for layer in range(2)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(x, costs, specs)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        # The routing call alone, on the same scores and costs (outside the timed step).
        with torch.no_grad():
            scores = torch.softmax(torch.randn(args.batch, 8), dim=1)
            start = time.perf_counter()
            for layer_costs in costs:
                route(policy, scores, layer_costs, failure_energy=channel.failure_energy_j, **params)
            routing = time.perf_counter() - start
        if step >= args.warmup:
            step_times.append(elapsed)
            route_times.append(routing)
            experts.append(sum(float(m["experts_per_input"]) for m in out.layer_metrics) / 2)
    return step_times, route_times, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/router.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channel = WirelessChannel(ChannelConfig(), num_devices=8, d_model=128, seed=0)

    rows = []
    # Interleave repetitions so drifting machine load affects every policy alike.
    samples = {label: ([], [], []) for label, _, _ in POLICIES}
    for _ in range(2):
        for label, policy, params in POLICIES:
            for store, values in zip(samples[label], time_training_steps(policy, params, args, channel)):
                store.extend(values)
    base = statistics.median(samples["topk"][0])
    print(f"training step, batch {args.batch}, K=8, 2 MoE layers, {args.threads} threads, {args.device}")
    print(f"{'policy':<9} {'step ms':>9} {'vs topk':>8} {'route ms/step':>14} {'experts/input':>14}")
    for label, policy, params in POLICIES:
        step_ms = statistics.median(samples[label][0]) * 1e3
        route_ms = statistics.median(samples[label][1]) * 1e3
        experts = statistics.mean(samples[label][2])
        ratio = step_ms / (base * 1e3)
        print(f"{label:<9} {step_ms:9.1f} {ratio:8.3f} {route_ms:14.2f} {experts:14.2f}")
        rows.append(dict(label=label, policy=policy, params=params, step_ms=step_ms, ratio_vs_topk=ratio,
                         route_ms_per_step=route_ms, experts_per_input=experts))
    result = dict(
        benchmark="router_overhead",
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     torch=torch.__version__, device=args.device, threads=args.threads),
        batch=args.batch, steps=args.steps * 2, rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
