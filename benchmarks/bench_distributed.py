"""runtime=distributed vs runtime=local: training-step time, rows/s and the bytes exchanged.

One training step (forward with the channel draw and top-2 routing, backward, global-norm
clipping, AdamW) of the model with its experts in process (local), then on 1 and 2 expert
workers (torch.distributed, gloo on localhost: 2 and 3 processes).  Rows/s counts the
routed input rows (images x tokens) of a step per second.  The bytes are those the
coordinator actually sent and received per MoE layer and step, next to the protocol's payload
model (rows x d_model x bits_per_element per hop; one hop down, one up).

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--models cnn vmoe] [--batch 256]
        [--steps 20] [--workers 1 2]

Prints the table with ratios vs local and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmoe_torch.channel import ChannelConfig, WirelessChannel  # noqa: E402
from dmoe_torch.channel.links import layer_costs  # noqa: E402
from dmoe_torch.models import DMoEClassifier  # noqa: E402
from dmoe_torch.models.vmoe import VMoEClassifier  # noqa: E402
from dmoe_torch.moe import RouterSpec  # noqa: E402
from dmoe_torch.utils import atomic_write_json  # noqa: E402


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.model == "vmoe":
        return VMoEClassifier(1, 10, 28, d_model=64, num_experts=8, depth=4, moe_every=2, patch_size=4)
    return DMoEClassifier(1, 10, 28, d_model=128, num_experts=8, num_moe_layers=2)


def timed_steps(args) -> dict:
    """Train ``warmup + steps`` steps on the active runtime; medians and byte counts per step."""
    from dmoe_torch import runtime

    torch.set_num_threads(args.threads)
    model = build(args)
    channel = WirelessChannel(ChannelConfig(), num_devices=8, d_model=model.moe_layers[0].d_model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runtime.attach_experts(model, optimizer, payload_bits=channel.payload_bits)
    stats = getattr(runtime._active, "stats", None)
    spec = RouterSpec("topk", k=2, failure_energy=channel.failure_energy_j)
    L, T = model.num_moe_layers, model.tokens_per_input
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    step_s, links = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and stats is not None:
            stats.layers.clear()  # count the timed steps only
        ids = torch.arange(step * args.batch, (step + 1) * args.batch)
        start = time.perf_counter()
        out = model(x, layer_costs(channel, ids, L, 0, T), [spec] * L)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + 0.01 * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        runtime.clip_grad_norm(model, 1.0)
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            step_s.append(elapsed)
            links.append(sum(int((s.mask & ~s.failed).sum()) for s in out.selections))
    result = {
        "step_ms": statistics.median(step_s) * 1e3,
        "rows_per_step": args.batch * T,
        "links_per_step": statistics.mean(links),
        "payload_bits": channel.payload_bits,
        "layers": L,
    }
    result["rows_per_s"] = result["rows_per_step"] / (result["step_ms"] / 1e3)
    if stats is not None:
        per_step = lambda key: sum(c[key] for c in stats.layers.values()) / args.steps / L  # noqa: E731
        result["bytes_per_layer_step"] = {
            key: per_step(key)
            for key in ("forward_sent", "forward_received", "backward_sent", "backward_received", "header_bytes")
        }
        result["rows_exchanged_per_layer_step"] = per_step("rows")
    return result


def _job(cfg, out_dir):
    (Path(out_dir) / "result.json").write_text(json.dumps(timed_steps(argparse.Namespace(**cfg.bench))))
    return 0


def _rank(rank: int, world_size: int, port: int, bench: dict, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(bench["threads"])
    from dmoe_torch.runtime import launch

    cfg = OmegaConf.create({"runtime": {"name": "distributed", "backend": "gloo", "timeout_s": 300}, "bench": bench})
    launch(cfg, _job, out_dir)  # rank 0 also writes exchange.json there


def distributed_run(args, workers: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("spawn")
        processes = [context.Process(target=_rank, args=(r, workers + 1, port, vars(args), tmp)) for r in range(workers + 1)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(1800)
        if any(process.exitcode != 0 for process in processes):
            raise SystemExit(f"distributed run with {workers} workers failed: exit codes {[p.exitcode for p in processes]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def compare(args) -> list[dict]:
    """Local, then each worker count, for ``args.model``: printed side by side, returned as rows."""
    runs = {"local": timed_steps(args)}
    for workers in args.workers:
        runs[f"{workers} worker{'s' if workers > 1 else ''}"] = distributed_run(args, workers)
    base = runs["local"]
    print(
        f"\ntraining step, {args.model} model (K=8, {base['layers']} MoE layers, top-2), batch {args.batch} = "
        f"{base['rows_per_step']} routed rows per MoE layer, {args.threads} thread(s) per process, gloo on localhost"
    )
    print(
        f"{'runtime':<10} {'step ms':>8} {'vs local':>9} {'rows/s':>9} {'vs local':>9} {'fwd MB out':>11} "
        f"{'fwd MB back':>12} {'bwd MB out':>11} {'model MB/hop':>13} {'out/model':>10}"
    )
    rows = []
    for name, run in runs.items():
        exchanged = run.get("bytes_per_layer_step")
        row = dict(
            model=args.model,
            runtime=name,
            step_ms=run["step_ms"],
            step_vs_local=run["step_ms"] / base["step_ms"],
            rows_per_s=run["rows_per_s"],
            rows_per_s_vs_local=run["rows_per_s"] / base["rows_per_s"],
            links_per_step=run["links_per_step"],
        )
        cells = ["-"] * 5
        if exchanged:
            model_bytes = run["rows_exchanged_per_layer_step"] * run["payload_bits"] / 8
            row.update(
                bytes_per_layer_step=exchanged,
                rows_exchanged_per_layer_step=run["rows_exchanged_per_layer_step"],
                payload_model_bytes_per_hop=model_bytes,
                forward_sent_over_model=exchanged["forward_sent"] / model_bytes,
            )
            cells = [
                f"{exchanged['forward_sent'] / 1e6:.3f}",
                f"{exchanged['forward_received'] / 1e6:.3f}",
                f"{exchanged['backward_sent'] / 1e6:.3f}",
                f"{model_bytes / 1e6:.3f}",
                f"{row['forward_sent_over_model']:.2f}",
            ]
        rows.append(row)
        print(
            f"{name:<10} {row['step_ms']:8.1f} {row['step_vs_local']:9.2f} {row['rows_per_s']:9.0f} "
            f"{row['rows_per_s_vs_local']:9.2f} {cells[0]:>11} {cells[1]:>12} {cells[2]:>11} {cells[3]:>13} {cells[4]:>10}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=("cnn", "vmoe"), nargs="+", default=["cnn", "vmoe"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/distributed.json"))
    args = parser.parse_args()

    rows = []
    for model in args.models:
        rows += compare(argparse.Namespace(**{**vars(args), "model": model}))
    print(
        "MB per MoE layer and step (fwd: rows out, expert outputs back; bwd: output gradients out); payload model = "
        "rows routed to experts x d_model x 16 bit per hop; the runtime sends float32"
    )
    result = dict(
        benchmark="distributed_runtime",
        machine=dict(
            platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, threads_per_process=args.threads
        ),
        batch=args.batch,
        steps=args.steps,
        workers=args.workers,
        rows=rows,
    )
    out = atomic_write_json(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
