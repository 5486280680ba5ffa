"""P3 on a trained model's own image frames: the fast solver (frame_jesa) against the MILP.

The checkpoint's model runs on the first F test images with channel.frame=image and JESA
(P3) routing at every MoE layer; the gate scores of each layer's frames ([F, 49, K] for the
7x7 token models) and those frames' link energies and capacities (the checkpoint's channel,
evaluation draw 0, T_max from --latency) are then solved by frame_jesa (without and with
price rounds, and with the rescue rounds the MoE layer runs, "+r": price rounds only on the
frames the heuristic left without a feasible plan) and by the exact MILP (milp_p3, HiGHS,
time limit per frame).  Printed per
(T_max, gamma, layer): the share of frames that are P3-feasible, the share the MILP proved,
and for the fast solver the share where it found a feasible plan, equals the optimum, is
certified, and its mean / worst relative gap.

    python benchmarks/bench_frame_trained.py --ckpt outputs/default/checkpoint.pt [--frames 16]
        [--gammas 0.25 0.5] [--latency 1e-3 2e-3] [--time-limit 10]

Writes benchmarks/results/frame_trained.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frame import fmt, gap_stats  # noqa: E402  (the same gap statistics as the synthetic frames)

from dmoe_torch.channel import WirelessChannel  # noqa: E402
from dmoe_torch.channel.links import eval_stream, layer_links  # noqa: E402
from dmoe_torch.config import channel_config  # noqa: E402
from dmoe_torch.data import build_datasets  # noqa: E402
from dmoe_torch.engine.build import build_model  # noqa: E402
from dmoe_torch.engine.checkpoint import load_checkpoint  # noqa: E402
from dmoe_torch.moe import RouterSpec  # noqa: E402
from dmoe_torch.selection.exact import milp_p3  # noqa: E402
from dmoe_torch.selection.frame_jesa import frame_jesa  # noqa: E402
from dmoe_torch.selection.registry import RESCUE_ROUNDS  # noqa: E402
from dmoe_torch.utils import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "frame_trained.json"


def trained_frames(model, cfg, images, ids, latency_s: float, gamma: float, k_max: int):
    """Per MoE layer: (scores [F, T, K], costs [F, K, N], capacity [F, K, N]) of the model's
    own frames under image-frame JESA routing."""
    channel_cfg = replace(channel_config(cfg), frame="image", latency_budget_s=latency_s)
    channel = WirelessChannel(channel_cfg, int(cfg.model.num_experts), int(cfg.model.d_model), int(cfg.seed))
    specs = [RouterSpec("jesa", gamma=gamma, k_max=k_max)] * model.num_moe_layers
    scores = []
    hooks = [
        layer.gate.register_forward_hook(lambda module, inputs, logits: scores.append(torch.softmax(logits.float(), 1).detach()))
        for layer in model.moe_layers
    ]
    links, _ = layer_links(channel, ids, specs, eval_stream(0), model.tokens_per_input)
    with torch.no_grad():
        model(images, links, specs)
    for hook in hooks:
        hook.remove()
    F = len(ids)
    return [
        (s.view(F, -1, s.shape[1]).numpy().astype(np.float64), link.costs.numpy(), link.capacity.numpy())
        for s, link in zip(scores, links, strict=True)
    ]


def frame_cell(s, e, c, latency_s: float, gamma: float, layer: int, k_max: int, price_rounds: int, time_limit: float) -> dict:
    """One (T_max, gamma, layer) cell: the solver as the layer runs it, plain and priced, against the MILP."""
    fast = frame_jesa(s, e, c, gamma, 1, k_max)
    layer_plan = frame_jesa(s, e, c, gamma, 1, k_max, rescue_rounds=RESCUE_ROUNDS)  # what the MoE layer runs
    start = time.perf_counter()
    priced = frame_jesa(s, e, c, gamma, 1, k_max, price_rounds=price_rounds)
    t_fast = (time.perf_counter() - start) / len(s)
    start = time.perf_counter()
    exact = milp_p3(s, e, c, gamma, 1, k_max, time_limit=time_limit)
    t_milp = (time.perf_counter() - start) / len(s)
    proven = exact.certified | ~exact.feasible & np.isnan(exact.lower_bound)
    a, b = gap_stats(fast, exact, proven), gap_stats(priced, exact, proven)
    r = gap_stats(layer_plan, exact, proven)
    return {
        "T_max_ms": latency_s * 1e3,
        "gamma": gamma,
        "layer": layer + 1,
        "frames": len(s),
        "feasible": float(exact.feasible.mean()),
        "milp_proven": float(proven.mean()),
        "fast": a,
        "fast_rescued": r,
        "fast_priced": b,
        "ms_per_frame": {"fast_priced": t_fast * 1e3, "milp": t_milp * 1e3},
    }


def print_cell(row: dict) -> None:
    """One line of the table."""
    a, b, r = row["fast"], row["fast_priced"], row["fast_rescued"]
    ms = row["ms_per_frame"]
    print(
        " | ".join(
            [
                f"{row['T_max_ms']:g} ms",
                f"{row['gamma']:g}",
                str(row["layer"]),
                f"{row['feasible']:.2f}",
                f"{row['milp_proven']:.2f}",
                fmt(a["found"], ".2f"),
                fmt(r["found"], ".2f"),
                fmt(r["optimal"], ".2f"),
                fmt(r["mean_gap"], ".2e"),
                fmt(r["worst_gap"], ".2e"),
                fmt(b["found"], ".2f"),
                fmt(b["optimal"], ".2f"),
                fmt(b["certified"], ".2f"),
                fmt(b["mean_gap"], ".2e"),
                fmt(b["worst_gap"], ".2e"),
                f"{ms['fast_priced']:.0f} / {ms['milp']:.0f}",
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--latency", type=float, nargs="+", default=[1e-3, 2e-3])
    parser.add_argument("--k-max", type=int, default=2)
    parser.add_argument("--price-rounds", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from omegaconf import OmegaConf

    checkpoint = load_checkpoint(args.ckpt)
    cfg = OmegaConf.create(checkpoint["config"])
    _, _, test_ds, info = build_datasets(cfg.data.name, args.data_root, val_size=0, seed=0, limit_test=args.frames)
    model = build_model(cfg, info)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    images, _, ids = next(iter(torch.utils.data.DataLoader(test_ds, batch_size=args.frames)))

    print(
        f"P3 on the frames of {args.ckpt}: {args.frames} test images, k_min 1, k_max {args.k_max}, "
        f"MILP limit {args.time_limit:g} s per frame, {args.price_rounds} price rounds (+p)"
    )
    print(
        "T_max | gamma | layer | feasible | MILP proven | found | found +r | optimal +r | mean gap +r | worst gap +r | "
        "found +p | optimal +p | certified +p | mean gap +p | worst gap +p | ms/frame fast +p / MILP"
    )
    rows = []
    for latency_s in args.latency:
        for gamma in args.gammas:
            for layer, (s, e, c) in enumerate(trained_frames(model, cfg, images, ids, latency_s, gamma, args.k_max)):
                row = frame_cell(s, e, c, latency_s, gamma, layer, args.k_max, args.price_rounds, args.time_limit)
                rows.append(row)
                print_cell(row)
    out = atomic_write_json(
        args.out,
        {
            "ckpt": args.ckpt,
            "frames": args.frames,
            "k_max": args.k_max,
            "price_rounds": args.price_rounds,
            "milp_time_limit_s": args.time_limit,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
