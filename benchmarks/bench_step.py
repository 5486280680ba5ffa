"""Training-step time of the default model (convmoe) against the previous token model (vmoe).

One training step as train.py runs it (channel draw of every MoE layer, forward with routing
and link dropout, backward, AdamW) on a batch of real Fashion-MNIST images, for each model
built from its conf/model/*.yaml, routed by topk@2, des and jesa (gamma 0.25, k_max 2: the
evaluation's budget), and by `none` (no expert runs: the step without expert compute).

* expert share = 1 - step(none) / step(topk): the part of a top-2 step spent dispatching
  to and running the experts (forward and backward);
* image frames (channel.frame=image): convmoe's step with the P3 solver (jesa) and with
  Switch-style top-2 (topk_capacity), against the token-frame jesa step (target <= 1.5x).

Every (model, policy) cell runs in the same process, interleaved over repetitions so that a
drifting machine load affects each alike; ratios are against the same model's topk step and
against convmoe topk.

    python benchmarks/bench_step.py [--batch 256] [--steps 8] [--reps 2] [--threads 2]

Prints the table and writes benchmarks/results/step.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.channel.links import layer_links
from dmoe_torch.data import build_datasets
from dmoe_torch.engine.build import build_model
from dmoe_torch.moe import RouterSpec
from dmoe_torch.utils import atomic_write_json, machine_facts

REPO = Path(__file__).resolve().parents[1]
# (model, frame, label, policy, router parameters)
CELLS = [
    (model, "token", label, policy, params)
    for model in ("convmoe", "vmoe")
    for label, policy, params in (
        ("topk@2", "topk", dict(k=2)),
        ("des 0.25", "des", dict(gamma=0.25, k_max=2)),
        ("jesa 0.25", "jesa", dict(gamma=0.25, k_max=2)),
        # pinned to two experts (any pair reaches gamma): the same expert work as top-2, so the
        # ratio is the router's own cost (target <= 1.05x)
        ("des =2", "des", dict(gamma=0.01, k_min=2, k_max=2)),
        ("jesa =2", "jesa", dict(gamma=0.01, k_min=2, k_max=2)),
        ("none", "none", {}),
    )
] + [
    ("convmoe", "image", "jesa 0.25", "jesa", dict(gamma=0.25, k_max=2)),
    ("convmoe", "image", "topk_capacity@2", "topk_capacity", dict(k=2)),
]


def build(name: str, info) -> torch.nn.Module:
    cfg = OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))})
    return build_model(cfg, info)


def time_steps(name, frame, policy, params, args, info, x, y, channels) -> tuple[list[float], float]:
    """Seconds per timed step (channel draw included) and mean experts per token."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(name, info).to(device).train()
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    channel = channels[name, frame]
    spec = RouterSpec(policy=policy, failure_energy=channel.failure_energy_j, **params)
    specs = [spec] * model.num_moe_layers
    generator = torch.Generator().manual_seed(0)
    times, experts = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.arange(step * args.batch, (step + 1) * args.batch)
        start = time.perf_counter()
        costs, delivered = layer_links(channel, ids, specs, step, model.tokens_per_input)
        out = model(x, costs, specs, generator=generator, delivered=delivered)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            experts.append(statistics.fmean(float(m["experts_per_input"]) for m in out.layer_metrics))
    return times, statistics.fmean(experts)


def print_table(cells: list, ms: dict, experts: dict, args) -> list[dict]:
    """Print each cell's median step time beside its model's and convmoe's top-2 step; the rows."""
    print(
        f"training step, batch {args.batch} Fashion-MNIST images, K=8, N=16, {args.threads} threads, "
        f"median of {args.steps * args.reps} steps per cell"
    )
    header = (
        f"{'model':<8} {'frame':<6} {'policy':<16} {'step ms':>8} {'vs own topk':>11} "
        f"{'vs convmoe topk':>15} {'experts/token':>13}"
    )
    print(header)
    rows = []
    base = ms["convmoe", "token", "topk@2"]
    for name, frame, label, policy, params in cells:
        key = (name, frame, label)
        own = ms[name, "token", "topk@2"]
        used = statistics.fmean(experts[key])
        print(f"{name:<8} {frame:<6} {label:<16} {ms[key]:8.1f} {ms[key] / own:11.3f} {ms[key] / base:15.3f} {used:13.2f}")
        rows.append(
            dict(
                model=name,
                frame=frame,
                label=label,
                policy=policy,
                params=params,
                step_ms=ms[key],
                ratio_vs_own_topk=ms[key] / own,
                ratio_vs_convmoe_topk=ms[key] / base,
                experts_per_token=used,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="benchmarks/results/step.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="convmoe,vmoe", help="comma-separated, from convmoe, vmoe")
    parser.add_argument("--frames", default="token,image", help="comma-separated, from token, image")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, _, test_ds, info = build_datasets("fashion_mnist", args.data_root, val_size=0, seed=0, limit_test=args.batch)
    x, y, _ = next(iter(torch.utils.data.DataLoader(test_ds, batch_size=args.batch)))
    models = args.models.split(",")
    cells = [cell for cell in CELLS if cell[0] in models and cell[1] in args.frames.split(",")]
    channels = {}
    for name in models:
        d_model = build(name, info).moe_layers[0].d_model
        for frame in ("token", "image"):
            channels[name, frame] = WirelessChannel(replace(ChannelConfig(), frame=frame), num_devices=8, d_model=d_model, seed=0)

    samples = {cell[:3]: [] for cell in cells}
    experts = {cell[:3]: [] for cell in cells}
    for _ in range(args.reps):  # interleaved repetitions
        for name, frame, label, policy, params in cells:
            times, used = time_steps(name, frame, policy, params, args, info, x, y, channels)
            samples[name, frame, label].extend(times)
            experts[name, frame, label].append(used)
    ms = {key: statistics.median(values) * 1e3 for key, values in samples.items()}

    rows = print_table(cells, ms, experts, args)
    shares = {name: 1.0 - ms[name, "token", "none"] / ms[name, "token", "topk@2"] for name in models}
    image_vs_token = (
        ms["convmoe", "image", "jesa 0.25"] / ms["convmoe", "token", "jesa 0.25"]
        if ("convmoe", "image", "jesa 0.25") in ms
        else math.nan
    )
    print("expert share of a top-2 step (1 - none / topk): " + ", ".join(f"{n} {s:.0%}" for n, s in shares.items()))
    vmoe_ratio = ms["vmoe", "token", "topk@2"] / ms["convmoe", "token", "topk@2"] if "vmoe" in models else None
    print(
        f"vmoe / convmoe topk step: {vmoe_ratio or float('nan'):.2f}x; "
        f"convmoe image-frame jesa / token-frame jesa: {image_vs_token:.2f}x (target <= 1.5x)"
    )
    result = dict(
        benchmark="training_step",
        machine=machine_facts(
            threads=args.threads,
            omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        ),
        batch=args.batch,
        steps_per_cell=args.steps * args.reps,
        rows=rows,
        expert_share=shares,
        vmoe_over_convmoe_topk=vmoe_ratio,
        image_over_token_jesa=image_vs_token,
        device=args.device,
    )
    out = atomic_write_json(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
