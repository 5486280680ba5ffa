"""Energy of topk@2, des, jesa and the MILP optimum under each channel model (no checkpoint).

The routers see the channel alone here: gate scores are a fixed synthetic draw (softmax of
N(0, 1.5^2) logits over K = 8 experts, seeded), the same for every channel, so the rows
differ only by the channel.  d_model 64 (the vmoe default: 1,024 bits per hop), N = 16,
B = 1 MHz, the default power and T_max, evaluation's budget k_max = 2.  The 120 kHz rows
scale T_max by 1 MHz / 120 kHz, so a hop needs the same spectral efficiency as at 1 MHz.

    python scripts/channel_study.py [--frames 2000] [--optimal-frames 200]

Prints a markdown table and writes benchmarks/results/channel_study.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.selection import route  # noqa: E402

SPACING_120K = dict(subcarrier_bandwidth_hz=120e3, latency_budget_s=1e-3 * 1e6 / 120e3)
CHANNELS = [("rayleigh (i.i.d.)", dict(model="rayleigh"))]
CHANNELS += [(f"tdl A {round(ds * 1e9)} ns, 1 MHz", dict(model="tdl", delay_spread_s=ds)) for ds in (30e-9, 100e-9, 300e-9, 1e-6)]
CHANNELS += [
    (f"tdl A {round(ds * 1e9)} ns, 120 kHz", dict(model="tdl", delay_spread_s=ds, **SPACING_120K)) for ds in (30e-9, 300e-9, 1e-6)
]
CHANNELS += [
    ("umi A 100 ns, 1 MHz", dict(model="umi", delay_spread_s=100e-9)),
    ("uma A 300 ns, 1 MHz", dict(model="uma", delay_spread_s=300e-9)),
]
POLICIES = [
    ("topk@2", "topk", dict(k=2)),
    ("des", "des", dict(k_max=2)),
    ("jesa", "jesa", dict(k_max=2)),
    ("optimal", "optimal", dict(k_max=2)),
]


def study(args) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    scores = torch.softmax(1.5 * torch.randn(args.frames, 8, generator=generator, dtype=torch.float64), dim=1)
    rows = []
    for label, overrides in CHANNELS:
        channel = WirelessChannel(ChannelConfig(**overrides), num_devices=8, d_model=64, seed=0)
        costs = channel.costs(torch.arange(args.frames), 0, 0)
        row = dict(channel=label, overrides=overrides, outage_per_link=float(torch.isinf(costs).double().mean()))
        for name, policy, params in POLICIES:
            n = args.optimal_frames if policy == "optimal" else args.frames
            gamma = {} if policy == "topk" else dict(gamma=args.gamma)
            sel = route(policy, scores[:n], costs[:n], failure_energy=channel.failure_energy_j, **gamma, **params)
            row[f"{name}_uj"] = float(sel.energy.mean()) * 1e6
            if policy == "jesa":  # the same frames as optimal, for the gap
                row["jesa_on_optimal_frames_uj"] = float(sel.energy[: args.optimal_frames].mean()) * 1e6
        row["jesa_saving_vs_des"] = 1.0 - row["jesa_uj"] / row["des_uj"]
        row["jesa_gap_to_optimal"] = row["jesa_on_optimal_frames_uj"] / row["optimal_uj"] - 1.0
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--optimal-frames", type=int, default=200)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--out", default="benchmarks/results/channel_study.json")
    args = parser.parse_args()
    rows = study(args)
    print(
        f"energy per frame and MoE layer (uJ), gamma {args.gamma}, k_max 2, {args.frames} frames "
        f"(optimal: the first {args.optimal_frames}), synthetic gate scores"
    )
    print("| channel | outage/link | topk@2 | des | jesa | optimal | jesa vs des | jesa gap to optimal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['channel']} | {r['outage_per_link']:.2%} | {r['topk@2_uj']:.1f} | {r['des_uj']:.1f} | {r['jesa_uj']:.1f} | "
            f"{r['optimal_uj']:.1f} | {-r['jesa_saving_vs_des']:+.1%} | {r['jesa_gap_to_optimal']:+.2%} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                study="channel_models",
                frames=args.frames,
                optimal_frames=args.optimal_frames,
                gamma=args.gamma,
                k_max=2,
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
