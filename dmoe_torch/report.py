"""Result tables (CSV, markdown), the accuracy-vs-energy plot and TensorBoard helpers.

Every result file is written atomically (temporary file + rename): an interrupted run leaves
the previous file or none, never a truncated one.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from .utils import atomic_write, atomic_write_text

# Columns of results.csv, in order.  energy_uj: per image, summed over its tokens and all MoE
# layers, microjoules; energy_per_token_uj: the same per token; experts_per_token and the rates:
# per (token, MoE layer) frame, averaged over the draws (a token is the whole image for the
# per-image model); outage_rate: failed selected links / selected links.
RESULT_COLUMNS = (
    "policy",
    "gamma",
    "accuracy_mean",
    "accuracy_std",
    "energy_uj_mean",
    "energy_uj_std",
    "energy_per_token_uj",
    "experts_per_token",
    "outage_rate",
    "violation_rate",
    "drop_rate",
    "certified_rate",
    "nodes",
    "loss",
    "draws",
    "inputs",
)
_MEAN_OVER_DRAWS = ("energy_per_token_uj", "experts_per_token", "outage_rate", "violation_rate", "drop_rate", "certified_rate", "nodes", "loss")
# Policies that solve an optimisation problem and can certify optimality.
_CERTIFYING = ("des", "jesa", "optimal")


def format_gamma(gamma: Any) -> str:
    """``None`` -> "", ``0.9`` -> "0.9", ``[0.9, 0.5]`` -> "[0.9, 0.5]"."""
    if gamma is None:
        return ""
    if isinstance(gamma, (list, tuple)):
        return "[" + ", ".join(f"{g:g}" for g in gamma) + "]"
    return f"{gamma:g}"


def summarise_draws(setting, results: list[dict[str, float]]) -> dict[str, Any]:
    """One results row from the per-draw metrics of one setting (an ``EvalPolicy``)."""

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    accuracy = [r["accuracy"] for r in results]
    energy = [r["energy_uj"] for r in results]
    row: dict[str, Any] = {
        "policy": setting.label,
        "gamma": format_gamma(setting.gamma),
        "accuracy_mean": statistics.fmean(accuracy),
        "accuracy_std": std(accuracy),
        "energy_uj_mean": statistics.fmean(energy),
        "energy_uj_std": std(energy),
    }
    for name in _MEAN_OVER_DRAWS:
        row[name] = statistics.fmean(r[name] for r in results)
    row["draws"] = len(results)
    row["inputs"] = int(results[0]["inputs"])
    return row


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (repr(value) if isinstance(value, float) else value) for key, value in row.items()})
    return buffer.getvalue()


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table: accuracy and energy as mean ± std over channel draws."""
    header = ("policy", "gamma", "accuracy", "energy (uJ/image)", "experts/token", "outage", "violation", "drop", "certified")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        name = row["policy"].split("@")[0]
        cells = (
            row["policy"],
            row["gamma"] or "-",
            f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}",
            f"{row['energy_uj_mean']:.2f} ± {row['energy_uj_std']:.2f}",
            f"{row['experts_per_token']:.2f}",
            f"{row['outage_rate']:.2%}",
            f"{row['violation_rate']:.2%}",
            f"{row['drop_rate']:.2%}",
            f"{row['certified_rate']:.2%}" if name in _CERTIFYING else "-",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_energy_figure(rows: list[dict[str, Any]], title: str = ""):
    """Accuracy vs. energy per input (log axis), one series per policy, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.0))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["policy"], []).append(row)
    for label, points in series.items():
        # Energies of 0 cannot sit on a log axis (e.g. every expert unreachable).
        points = sorted((p for p in points if p["energy_uj_mean"] > 0), key=lambda p: p["energy_uj_mean"])
        if not points:
            continue
        x = [p["energy_uj_mean"] for p in points]
        y = [p["accuracy_mean"] for p in points]
        axes.errorbar(
            x, y, xerr=[p["energy_uj_std"] for p in points], yerr=[p["accuracy_std"] for p in points],
            marker="o", markersize=4, capsize=2, linestyle="-" if len(points) > 1 else "none", label=label,
        )
        for point in points:
            if point["gamma"]:
                axes.annotate(point["gamma"], (point["energy_uj_mean"], point["accuracy_mean"]),
                              textcoords="offset points", xytext=(3, -9), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("transmission energy per input (µJ, all MoE layers)")
    axes.set_ylabel("test accuracy")
    if title:
        axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_figure(figure, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def write_results(rows: list[dict[str, Any]], output_dir: str | Path, *, title: str = "") -> None:
    """Write results.csv, results.md, results.png and TensorBoard events; print the table."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    output_dir = Path(output_dir)
    table = results_markdown(rows)
    atomic_write_text(output_dir / "results.csv", results_csv(rows))
    atomic_write_text(output_dir / "results.md", (f"# {title}\n\n" if title else "") + table)
    figure = accuracy_energy_figure(rows, title)
    save_figure(figure, output_dir / "results.png")
    writer = SummaryWriter(log_dir=str(output_dir))
    try:
        writer.add_figure("eval/accuracy_vs_energy", figure, close=False)
        writer.add_text("eval/results", table)
        for step, row in enumerate(rows):
            tag = f"{row['policy']}" + (f"/gamma={row['gamma']}" if row["gamma"] else "")
            writer.add_scalar(f"eval/accuracy/{tag}", row["accuracy_mean"], 0)
            writer.add_scalar(f"eval/energy_uj/{tag}", row["energy_uj_mean"], 0)
    finally:
        writer.close()
        plt.close(figure)
    print(table, file=sys.stdout, flush=True)


# ---------------------------------------------------------------------------------------------
# TensorBoard and console during training


def log_scalars(writer, prefix: str, metrics: dict[str, Any], step: int) -> None:
    """``prefix/name`` for every finite scalar in ``metrics``; lists become ``prefix/name_<i>``."""
    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, dict):  # per-layer metrics
                    log_scalars(writer, f"{prefix}/{name}_{index}", item, step)
                else:
                    writer.add_scalar(f"{prefix}/{name}_{index}", float(item), step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", float(value), step)


def log_epoch(writer, record: dict[str, Any], step: int) -> None:
    """Epoch-level TensorBoard points: train/*, router/* (training routing), val/*."""
    train = dict(record["train"])
    router = train.pop("router", {})
    train.pop("steps", None)
    log_scalars(writer, "train/epoch", train, step)
    log_scalars(writer, "router", router, step)
    if record["val"]:
        val = {k: v for k, v in record["val"].items() if k in ("loss", "accuracy")}
        log_scalars(writer, "val", val, step)
        log_scalars(writer, "val_router", {k: v for k, v in record["val"].items() if k not in val and k != "inputs"}, step)
    writer.flush()


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One console line per epoch."""
    train, val = record["train"], record["val"]
    router = train.get("router", {})
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"train loss {train['loss']:.4f} acc {train['accuracy']:.4f}",
    ]
    if val:
        parts.append(f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} energy {val['energy_uj']:.2f} uJ")
    if router:
        parts.append(f"train experts/token {router['experts_per_token']:.2f} outage {router['outage_rate']:.2%}")
    parts.append(f"{record['epoch_time_s']:.1f} s")
    return " | ".join(parts)
