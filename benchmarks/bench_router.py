"""Router overhead: one training step with des / jesa routing vs topk.

Target: a training step of the token model (batch 256 images, 49 tokens each, so about
12.5k routed rows per MoE block, K = 8 experts) routed by des or jesa takes at most 1.25x the
top-2 step.  The step includes the channel draw of every MoE layer.  With ``--ckpt`` the
model (and so its gate's scores) comes from a trained checkpoint: an untrained gate's
near-uniform scores need many experts to reach gamma, a trained one's do not.

    python benchmarks/bench_router.py [--model vmoe|cnn] [--ckpt outputs/default/checkpoint.pt]
        [--batch 256] [--steps 20] [--threads 2] [--device cpu]

Prints a table with ratios vs topk and writes benchmarks/results/router.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.channel.links import layer_costs
from dmoe_torch.models import DMoEClassifier
from dmoe_torch.models.vmoe import VMoEClassifier
from dmoe_torch.moe import RouterSpec
from dmoe_torch.selection import route
from dmoe_torch.utils import atomic_write_json, machine_facts

# (label, policy, router parameters).  The "=2" rows pin des / jesa to exactly two experts
# (k_min = k_max = 2, a target any pair meets), so they run the same expert compute as top-2
# and the ratio isolates the router's own overhead.  The gamma rows use the evaluation's
# default budget k_max = 2 ("K": up to all K experts, as many as gamma needs); an untrained
# gate's near-uniform scores need many experts to reach gamma, a trained one's fewer.
POLICIES = [
    ("topk", "topk", dict(k=2)),
    ("des =2", "des", dict(gamma=0.01, k_min=2, k_max=2)),
    ("jesa =2", "jesa", dict(gamma=0.01, k_min=2, k_max=2)),
    ("des 0.5", "des", dict(gamma=0.5, k_max=2)),
    ("jesa 0.5", "jesa", dict(gamma=0.5, k_max=2)),
    ("des 0.9", "des", dict(gamma=0.9, k_max=2)),
    ("jesa 0.9", "jesa", dict(gamma=0.9, k_max=2)),
    ("jesa 0.9 K", "jesa", dict(gamma=0.9)),
    ("dense", "dense", {}),
]


def build(args) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (trained weights with --ckpt) and a batch: real test images with --ckpt."""
    torch.manual_seed(0)
    if args.ckpt:
        from omegaconf import OmegaConf

        from dmoe_torch.data import build_datasets
        from dmoe_torch.engine.build import build_model
        from dmoe_torch.engine.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.ckpt)
        cfg = OmegaConf.create(checkpoint["config"])
        _, _, test_ds, info = build_datasets(cfg.data.name, "data", val_size=0, seed=0, limit_test=args.batch)
        model = build_model(cfg, info)
        model.load_state_dict(checkpoint["model"])
        x, y, _ = next(iter(torch.utils.data.DataLoader(test_ds, batch_size=args.batch)))
        return model, x, y
    if args.model == "vmoe":
        model = VMoEClassifier(1, 10, 28, d_model=64, num_experts=8, depth=4, moe_every=2, patch_size=4)
    else:
        model = DMoEClassifier(1, 10, 28, d_model=128, num_experts=8, num_moe_layers=2)
    return model, torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))


def time_training_steps(
    policy: str, params: dict, args, channel: WirelessChannel
) -> tuple[list[float], list[float], list[float]]:
    """Per timed step: step seconds (channel draw included), routing seconds (all MoE
    layers), experts per token (mean over layers)."""
    device = torch.device(args.device)
    model, x, y = build(args)
    model.to(device)
    x, y = x.to(device), y.to(device)
    L, T = model.num_moe_layers, model.tokens_per_input
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # small steps: the gate stays as trained
    spec = RouterSpec(policy=policy, failure_energy=channel.failure_energy_j, **params)
    specs = [spec] * L
    gate_scores: list[torch.Tensor] = []
    for layer in model.moe_layers:
        layer.gate.register_forward_hook(
            lambda module, inputs, logits: gate_scores.append(torch.softmax(logits.detach().float(), 1).cpu())
        )
    step_times, route_times, experts = [], [], []
    for step in range(args.warmup + args.steps):
        ids = torch.arange(step * args.batch, (step + 1) * args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        costs = layer_costs(channel, ids, L, 0, T)
        out = model(x, costs, specs)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        # The routing call alone, on the same scores and costs (outside the timed step).
        # The routing calls alone, on this step's gate scores (outside the timed step).
        with torch.no_grad():
            start = time.perf_counter()
            for scores, layer_cost in zip(gate_scores, costs, strict=True):
                route(policy, scores, layer_cost, failure_energy=channel.failure_energy_j, **params)
            routing = time.perf_counter() - start
        gate_scores.clear()
        if step >= args.warmup:
            step_times.append(elapsed)
            route_times.append(routing)
            experts.append(sum(float(m["experts_per_input"]) for m in out.layer_metrics) / L)
    return step_times, route_times, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", choices=("vmoe", "cnn"), default="vmoe", help="untrained architecture (without --ckpt)")
    parser.add_argument("--ckpt", default=None, help="a trained checkpoint.pt: its model, gate and real test images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/router.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe, _, _ = build(args)
    d_model = probe.moe_layers[0].d_model
    channel = WirelessChannel(ChannelConfig(), num_devices=8, d_model=d_model, seed=0)
    what = f"checkpoint {args.ckpt}" if args.ckpt else f"untrained {args.model}"

    rows = []
    # Interleave repetitions so drifting machine load affects every policy alike.
    samples = {label: ([], [], []) for label, _, _ in POLICIES}
    for _ in range(2):
        for label, policy, params in POLICIES:
            for store, values in zip(samples[label], time_training_steps(policy, params, args, channel), strict=True):
                store.extend(values)
    base = statistics.median(samples["topk"][0])
    rows_per_layer = args.batch * probe.tokens_per_input
    print(
        f"training step of {what}: batch {args.batch} images = {rows_per_layer} routed rows per MoE layer, "
        f"{probe.num_moe_layers} MoE layers, K=8, {args.threads} threads, {args.device}"
    )
    print(f"{'policy':<11} {'step ms':>9} {'vs topk':>8} {'route ms/step':>14} {'experts/token':>14}")
    for label, policy, params in POLICIES:
        step_ms = statistics.median(samples[label][0]) * 1e3
        route_ms = statistics.median(samples[label][1]) * 1e3
        experts = statistics.mean(samples[label][2])
        ratio = step_ms / (base * 1e3)
        print(f"{label:<11} {step_ms:9.1f} {ratio:8.3f} {route_ms:14.2f} {experts:14.2f}")
        rows.append(
            dict(
                label=label,
                policy=policy,
                params=params,
                step_ms=step_ms,
                ratio_vs_topk=ratio,
                route_ms_per_step=route_ms,
                experts_per_token=experts,
            )
        )
    result = dict(
        benchmark="router_overhead",
        machine=machine_facts(
            device=args.device,
            threads=args.threads,
        ),
        model=what,
        batch=args.batch,
        rows_per_layer=rows_per_layer,
        moe_layers=probe.num_moe_layers,
        steps=args.steps * 2,
        rows=rows,
    )
    out = atomic_write_json(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
