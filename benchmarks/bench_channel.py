"""Channel models side by side: tdl / umi vs rayleigh, in a training step and in evaluation.

Targets (issue 17): a token-model training step (batch 256 images x 49 tokens = 12,544
routed frames per MoE layer, K = 8, N = 16, 4 MoE layers, channel draw of every layer
included) with channel.model=tdl within 1.3x of the same step with rayleigh; evaluation
within 2x.  Three measurements per model, interleaved so drifting machine load hits every
model alike:

* draw:   the per-layer link costs of one batch alone (``layer_costs``: fading + energies);
* train:  draw + forward + backward + AdamW step of the untrained vmoe (router topk@2);
* eval:   draw + forward under no_grad with the same router (the evaluation's inner loop).

    python benchmarks/bench_channel.py [--batch 256] [--steps 10] [--threads 1]

Prints a table with ratios vs rayleigh and writes benchmarks/results/channel.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.channel.links import layer_costs
from dmoe_torch.models.vmoe import VMoEClassifier
from dmoe_torch.moe import RouterSpec
from dmoe_torch.utils import atomic_write_json, machine_facts

# (label, ChannelConfig overrides); the first row is the baseline.
MODELS = [
    ("rayleigh", dict(model="rayleigh")),
    ("tdl A 30ns", dict(model="tdl", tdl_profile="A", delay_spread_s=30e-9)),
    ("tdl A 100ns", dict(model="tdl", tdl_profile="A", delay_spread_s=100e-9)),
    ("tdl A 300ns", dict(model="tdl", tdl_profile="A", delay_spread_s=300e-9)),
    ("tdl D 100ns", dict(model="tdl", tdl_profile="D", delay_spread_s=100e-9)),
    ("umi A 100ns", dict(model="umi", tdl_profile="A", delay_spread_s=100e-9)),
]


def time_model(overrides: dict, args) -> dict[str, list[float]]:
    """Seconds per batch of the draw, the training step and the evaluation step."""
    torch.manual_seed(0)
    model = VMoEClassifier(1, 10, 28, d_model=64, num_experts=8, depth=4, moe_every=1, patch_size=4)
    channel = WirelessChannel(ChannelConfig(**overrides), num_devices=8, d_model=64, seed=0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    L, T = model.num_moe_layers, model.tokens_per_input
    specs = [RouterSpec(policy="topk", k=2, failure_energy=channel.failure_energy_j)] * L
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = {"draw": [], "train": [], "eval": []}
    for step in range(args.warmup + args.steps):
        ids = torch.arange(step * args.batch, (step + 1) * args.batch)
        start = time.perf_counter()
        costs = layer_costs(channel, ids, L, 0, T)
        drawn = time.perf_counter()
        out = model(x, costs, specs)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained = time.perf_counter()
        with torch.no_grad():
            start_eval = time.perf_counter()
            model(x, layer_costs(channel, ids + 10**7, L, 1, T), specs)
            evaluated = time.perf_counter()
        if step >= args.warmup:
            times["draw"].append(drawn - start)
            times["train"].append(trained - start)
            times["eval"].append(evaluated - start_eval)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes over the models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/channel.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = {label: {"draw": [], "train": [], "eval": []} for label, _ in MODELS}
    for _ in range(args.repeats):
        for label, overrides in MODELS:
            for kind, values in time_model(overrides, args).items():
                samples[label][kind].extend(values)
    base = {kind: statistics.median(samples[MODELS[0][0]][kind]) for kind in ("draw", "train", "eval")}
    print(
        f"vmoe (d_model 64, 4 MoE layers, topk@2), batch {args.batch} x 49 tokens = {args.batch * 49} frames per MoE layer, "
        f"K=8, N=16, {args.threads} thread(s), cpu"
    )
    print(f"{'model':<12} {'draw ms':>9} {'x':>6} {'train ms':>9} {'x':>6} {'eval ms':>9} {'x':>6}")
    rows = []
    for label, overrides in MODELS:
        row = dict(label=label, channel=overrides)
        line = f"{label:<12}"
        for kind in ("draw", "train", "eval"):
            ms = statistics.median(samples[label][kind]) * 1e3
            ratio = ms / (base[kind] * 1e3)
            row[f"{kind}_ms"], row[f"{kind}_ratio"] = ms, ratio
            line += f" {ms:9.1f} {ratio:6.2f}"
        print(line)
        rows.append(row)
    result = dict(
        benchmark="channel_models",
        machine=machine_facts(
            threads=args.threads,
            note="shared machine: other jobs ran alongside",
        ),
        batch=args.batch,
        frames_per_layer=args.batch * 49,
        moe_layers=4,
        steps=args.steps * args.repeats,
        targets=dict(train_ratio=1.3, eval_ratio=2.0),
        rows=rows,
    )
    out = atomic_write_json(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
