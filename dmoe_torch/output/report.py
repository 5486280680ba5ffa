"""Result tables (CSV, markdown), the accuracy-vs-energy plot and TensorBoard helpers.

Every result file is written atomically (temporary file + rename): an interrupted run leaves
the previous file or none, never a truncated one.

Statistics (:mod:`dmoe_torch.stats`): ``*_ci95`` is the half-width of a 95% interval over the
test images and channel draws (it includes the test-set sampling error); ``*_std`` the spread
over channel draws on this one test set (empty with one draw); ``vs_topk2_*`` a paired
comparison with topk@2 on the same images and channel draws.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from ..selection.policies import POLICY_TABLE
from ..utils import atomic_write, atomic_write_text
from .plots import target_text

# The row every other row is compared with, image by image (when it was evaluated).
REFERENCE_POLICY = "topk@2"

# Leading columns of results.csv, in order; then one group per MoE layer (LAYER_METRICS, as
# ``layer<l>_<metric>``, l = 1 for the first MoE layer), then ``seed`` and ``channel.<field>``
# (the channel the rows were evaluated on), then any column added by the caller.
#   energy_uj: per image, summed over its tokens and ALL MoE layers, microjoules;
#   energy_per_token_uj: the same per token; experts_per_token and the rates: per (token, MoE
#   layer) frame, i.e. averaged over the layers; outage_rate: failed selected links / selected
#   links.  Means are over the draws; *_ci95 / *_std / vs_topk2_*: see the module docstring.
#   k_min / k_max: the cardinality bounds of des / jesa / optimal (empty for other policies);
#   outage_target: the target of their conservative planning under imperfect CSI (empty: they
#   plan on the channel estimate; outage_rate stays the realised share of failed links).
RESULT_COLUMNS = (
    "policy",
    "gamma",
    "lam",
    "outage_target",
    "accuracy_mean",
    "accuracy_ci95",
    "accuracy_std",
    "energy_uj_mean",
    "energy_uj_ci95",
    "energy_uj_std",
    "vs_topk2_acc_diff",
    "vs_topk2_acc_diff_ci95",
    "vs_topk2_p_value",
    "vs_topk2_wins",
    "vs_topk2_losses",
    "energy_per_token_uj",
    "experts_per_token",
    "outage_rate",
    "frame_overrun_rate",
    "violation_rate",
    "drop_rate",
    "certified_rate",
    "nodes",
    "loss",
    "draws",
    "inputs",
    "k_min",
    "k_max",
)
_MEAN_OVER_DRAWS = (
    "energy_per_token_uj",
    "experts_per_token",
    "outage_rate",
    "frame_overrun_rate",
    "violation_rate",
    "drop_rate",
    "certified_rate",
    "nodes",
    "loss",
)
# Per MoE layer (energy per image at that layer; the rates per token at that layer).
LAYER_METRICS = ("energy_uj", "experts_per_token", "outage_rate", "violation_rate", "drop_rate", "certified_rate")
# Policies that solve an optimisation problem and can certify optimality.


def _certifies(policy: str) -> bool:
    """The policy solves a problem and reports certified optima (its certified column is shown)."""
    entry = POLICY_TABLE.get(policy)
    return entry is not None and entry.certifies


def _bounded(policy: str) -> bool:
    """The policy reads k_min / k_max (its k_min / k_max columns are filled)."""
    entry = POLICY_TABLE.get(policy)
    return entry is not None and entry.bounded


def lam_text(row: dict[str, Any]) -> str:
    """The multiplier of a lagrangian row for the tables' gamma column ("" for other rows)."""
    lam = row.get("lam", "")
    return "" if lam in ("", None) or (isinstance(lam, float) and math.isnan(lam)) else f"λ {float(lam):g}/J"


def format_gamma(gamma: Any) -> str:
    """``None`` -> "", ``0.9`` -> "0.9", ``[0.9, 0.5]`` -> "[0.9, 0.5]"."""
    if gamma is None:
        return ""
    if isinstance(gamma, (list, tuple)):
        return "[" + ", ".join(f"{g:g}" for g in gamma) + "]"
    return f"{gamma:g}"


def layer_column(layer: int, metric: str) -> str:
    """Column of ``metric`` at MoE layer ``layer`` (0-based): ``layer1_energy_uj`` for layer 0."""
    return f"layer{layer + 1}_{metric}"


def num_layers(row: dict[str, Any]) -> int:
    """The number of MoE layers a results row has columns for."""
    count = 0
    while layer_column(count, "energy_uj") in row:
        count += 1
    return count


def summarise_draws(setting, results: list[dict[str, Any]], images: list[dict] | None = None) -> dict[str, Any]:
    """One results row from the per-draw metrics of one setting (an ``EvalPolicy``).

    ``images``: the per-draw ``EvalTotals.per_image()`` dicts, for the 95% intervals (nan
    without them).  The comparison columns are filled by :func:`add_comparisons`.
    """
    draws = len(results)

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if draws > 1 else math.nan  # no spread from one draw

    accuracy = [r["accuracy"] for r in results]
    energy = [r["energy_uj"] for r in results]
    accuracy_ci95 = energy_ci95 = math.nan
    if images:
        _, accuracy_ci95 = stats.mean_ci95(np.stack([i["correct"].numpy() for i in images]))
        _, energy_ci95 = stats.mean_ci95(np.stack([i["energy_uj"].numpy() for i in images]))
    row: dict[str, Any] = {
        "policy": setting.label,
        "gamma": format_gamma(setting.gamma),
        "lam": "" if setting.lam is None else setting.lam,
        "outage_target": "" if getattr(setting, "outage_target", None) is None else f"{setting.outage_target:g}",
        "accuracy_mean": statistics.fmean(accuracy),
        "accuracy_ci95": accuracy_ci95,
        "accuracy_std": spread(accuracy),
        "energy_uj_mean": statistics.fmean(energy),
        "energy_uj_ci95": energy_ci95,
        "energy_uj_std": spread(energy),
        "vs_topk2_acc_diff": math.nan,
        "vs_topk2_acc_diff_ci95": math.nan,
        "vs_topk2_p_value": math.nan,
        "vs_topk2_wins": "",
        "vs_topk2_losses": "",
    }
    for name in _MEAN_OVER_DRAWS:
        if all(name in r for r in results):  # frame_overrun_rate is absent from results of older versions
            row[name] = statistics.fmean(r[name] for r in results)
    row["draws"] = draws
    row["inputs"] = int(results[0]["inputs"])
    gamma_policy = _bounded(setting.policy)
    row["k_min"] = int(setting.k_min) if gamma_policy else ""
    row["k_max"] = ("" if setting.k_max is None else int(setting.k_max)) if gamma_policy else ""
    for layer in range(len(results[0].get("layers", []))):
        for metric in LAYER_METRICS:
            row[layer_column(layer, metric)] = statistics.fmean(r["layers"][layer][metric] for r in results)
        if "utilisation" in results[0]["layers"][layer]:  # TensorBoard only (one value per expert)
            row[f"_utilisation_{layer}"] = np.mean([r["layers"][layer]["utilisation"] for r in results], axis=0).tolist()
    return row


def add_comparisons(rows: list[dict[str, Any]], images: list[list[dict]], reference: str = REFERENCE_POLICY) -> bool:
    """Fill the ``vs_topk2_*`` columns: each row against the ``reference`` row, image by image
    (same images, same channel draws).  ``images[i]``: the per-draw per-image results of
    ``rows[i]``.  Returns False (columns left empty) when no row is the reference."""
    index = next((i for i, row in enumerate(rows) if row["policy"] == reference), None)
    if index is None:
        return False
    base = np.stack([i["correct"].numpy() for i in images[index]])
    for row, own in zip(rows, images, strict=True):
        comparison = stats.paired_comparison(np.stack([i["correct"].numpy() for i in own]), base)
        row["vs_topk2_acc_diff"] = comparison.diff
        row["vs_topk2_acc_diff_ci95"] = comparison.ci95
        row["vs_topk2_p_value"] = comparison.p_value
        row["vs_topk2_wins"] = comparison.wins
        row["vs_topk2_losses"] = comparison.losses
    return True


def result_columns(rows: list[dict[str, Any]]) -> list[str]:
    """RESULT_COLUMNS, then every other key of the rows in first-seen order."""
    columns = list(RESULT_COLUMNS)
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return columns


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # empty: not available (e.g. std of one draw)
    return "" if value is None else value


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=result_columns(rows), lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return buffer.getvalue()


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.csv with numbers parsed (empty cells -> nan, text stays text)."""

    def parse(text: str) -> Any:
        if text == "":
            return math.nan
        try:
            return float(text) if any(c in text for c in ".eEn") else int(text)
        except ValueError:
            return text

    with open(path, newline="") as handle:
        return [
            {key: (value if key in ("policy", "gamma") else parse(value)) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def _pm(mean: float, half: float, digits: int, scale: float = 1.0) -> str:
    """ "mean ± half" (``n/a`` for a missing half-width)."""
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * half:.{digits}f}" if math.isfinite(half) else " ± n/a")


def _comparison_cell(row: dict[str, Any], reference: str) -> str:
    if row["policy"] == reference:
        return "reference"
    diff = row.get("vs_topk2_acc_diff", math.nan)
    if not isinstance(diff, float) or not math.isfinite(diff):
        return "n/a"
    p = row["vs_topk2_p_value"]
    p_text = f"p={p:.2g}" if p >= 0.001 else "p<0.001"
    return f"{100 * diff:+.2f} ± {100 * row['vs_topk2_acc_diff_ci95']:.2f} ({p_text})"


def _std_cell(row: dict[str, Any]) -> str:
    if not math.isfinite(row.get("accuracy_std", math.nan)):
        return "n/a"
    return f"{100 * row['accuracy_std']:.2f} / {row['energy_uj_std']:.2f}"


def results_markdown(rows: list[dict[str, Any]], reference: str = REFERENCE_POLICY) -> str:
    """The main table (accuracy and energy with 95% intervals, the paired comparison with
    ``reference``, the spread over draws) and a per-MoE-layer table."""
    header = (
        "policy",
        "gamma",
        "accuracy % (95% CI)",
        f"vs {reference} (pp, 95% CI, p)",
        "energy µJ/image, all MoE layers (95% CI)",
        "std over draws (pp / µJ)",
        "experts/token per MoE layer",
        "outage",
        "frame overrun",
        "violation",
        "drop",
        "certified",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        name = row["policy"].split("@")[0]
        cells = (
            row["policy"],
            ", ".join(filter(None, (row["gamma"], lam_text(row), target_text(row)))) or "-",
            _pm(row["accuracy_mean"], row.get("accuracy_ci95", math.nan), 2, 100.0),
            _comparison_cell(row, reference),
            _pm(row["energy_uj_mean"], row.get("energy_uj_ci95", math.nan), 2),
            _std_cell(row),
            f"{row['experts_per_token']:.2f}",
            f"{row['outage_rate']:.2%}",
            f"{row.get('frame_overrun_rate', math.nan):.2%}",
            f"{row['violation_rate']:.2%}",
            f"{row['drop_rate']:.2%}",
            f"{row['certified_rate']:.2%}" if _certifies(name) else "-",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def layers_markdown(rows: list[dict[str, Any]]) -> str:
    """Per MoE layer: energy per image at that layer (µJ) and experts / outage / violation per
    token at that layer, one ``a / b / ...`` cell per metric listing layer 1, 2, ..."""
    L = num_layers(rows[0]) if rows else 0
    if L == 0:
        return ""
    header = ("policy", "gamma", "energy µJ/image at layer 1 / 2 / ...", "experts/token", "outage", "violation")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:

        def per_layer(metric: str, fmt: str, row: dict = row) -> str:
            return " / ".join(format(row[layer_column(layer, metric)], fmt) for layer in range(L))

        cells = (
            row["policy"],
            ", ".join(filter(None, (row["gamma"], lam_text(row), target_text(row)))) or "-",
            per_layer("energy_uj", ".2f"),
            per_layer("experts_per_token", ".2f"),
            per_layer("outage_rate", ".2%"),
            per_layer("violation_rate", ".2%"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LEGEND = (
    "accuracy and energy: mean over channel draws ± half-width of the 95% interval over test images and draws "
    "(includes the test-set sampling error; the device geometry is fixed by the seed). vs {reference}: accuracy "
    "difference on the same images and draws, paired 95% interval and exact sign test (McNemar's exact test with "
    "one draw). std over draws: spread over channel draws on this test set only (n/a with one draw). Energy is per "
    "image, summed over its tokens and all MoE layers; experts/token and the rates are per token and MoE layer "
    "(averaged over the layers); outage: failed selected links / selected links; frame overrun: share of frames "
    "(a token, or an image's tokens at one MoE layer under channel.frame=image) in which some device's planned or "
    "realised hop time exceeded T_max."
)


def accuracy_energy_figure(rows: list[dict[str, Any]], title: str = "", *, pareto: bool = False):
    """Accuracy vs. energy per image: see :func:`dmoe_torch.output.plots.accuracy_energy_figure`."""
    from .plots import accuracy_energy_figure as plot

    return plot(rows, title, pareto=pareto)


def save_figure(figure, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def _hparam(value: Any) -> Any:
    """A value TensorBoard's HParams accept (number, string or bool)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return value
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


HPARAM_KEYS = ("policy", "gamma", "outage_target", "k_min", "k_max", "seed", "draws", "inputs")
HPARAM_METRICS = {
    "accuracy_mean": "eval/hparams/accuracy",
    "energy_uj_mean": "eval/hparams/energy_uj",
    "outage_rate": "eval/hparams/outage_rate",
    "experts_per_token": "eval/hparams/experts_per_token",
}


def log_evaluation(writer, rows: list[dict[str, Any]], figure=None, table: str = "") -> None:
    """TensorBoard events of an evaluation, every tag under ``eval/``.

    * ``eval/accuracy/<row>``, ``eval/energy_uj/<row>``, ``eval/outage_rate/<row>``: one point each;
    * ``eval/layer<l>/energy_uj/<row>`` and ``eval/layer<l>/experts_per_token/<row>`` per MoE layer;
    * ``eval/utilisation/layer<l>/<row>``: the share of tokens each expert served, step = expert index;
    * HParams (one run ``hparams/<i>`` per row): policy, gamma, k_min/k_max, seed and every
      ``channel.*`` column -> accuracy, energy, outage, experts/token, for TensorBoard's HParams tab.
    """
    if figure is not None:
        writer.add_figure("eval/accuracy_vs_energy", figure, close=False)
    if table:
        writer.add_text("eval/results", table)
    for index, row in enumerate(rows):
        tag = f"{row['policy']}" + (f"/gamma={row['gamma']}" if row["gamma"] else "")
        if target_text(row):
            tag += f"/outage_target={row['outage_target']}"
        writer.add_scalar(f"eval/accuracy/{tag}", row["accuracy_mean"], 0)
        writer.add_scalar(f"eval/energy_uj/{tag}", row["energy_uj_mean"], 0)
        writer.add_scalar(f"eval/outage_rate/{tag}", row["outage_rate"], 0)
        for layer in range(num_layers(row)):
            for metric in ("energy_uj", "experts_per_token"):
                writer.add_scalar(f"eval/layer{layer + 1}/{metric}/{tag}", row[layer_column(layer, metric)], 0)
            for expert, share in enumerate(row.get(f"_utilisation_{layer}", [])):
                writer.add_scalar(f"eval/utilisation/layer{layer + 1}/{tag}", share, expert)
        hparams = {key: _hparam(row.get(key)) for key in HPARAM_KEYS}
        hparams.update({key: _hparam(value) for key, value in row.items() if key.startswith("channel.")})
        metrics = {tag_name: float(row[key]) for key, tag_name in HPARAM_METRICS.items()}
        writer.add_hparams(hparams, metrics, run_name=f"hparams/{index:03d}")


def write_results(rows: list[dict[str, Any]], output_dir: str | Path, *, title: str = "", frontier: str = "") -> None:
    """Write results.csv, results.md, results.png and TensorBoard events; print the table.

    Keys of a row that start with ``_`` (e.g. ``_utilisation_<l>``, per-expert lists) go to
    TensorBoard only.  ``frontier``: the markdown of the per-family iso-accuracy summary
    (``dmoe_torch.output.frontier.frontier_markdown``), results.md's "Frontier" section, also printed.
    """
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    output_dir = Path(output_dir)
    public = [{key: value for key, value in row.items() if not key.startswith("_")} for row in rows]
    table = results_markdown(public)
    layers = layers_markdown(public)
    legend = LEGEND.format(reference=REFERENCE_POLICY)
    atomic_write_text(output_dir / "results.csv", results_csv(public))
    markdown = (f"# {title}\n\n" if title else "") + table + "\n" + legend + "\n"
    if layers:
        markdown += "\n## Per MoE layer\n\n" + layers
    if frontier:
        markdown += "\n## Frontier\n\n" + frontier
    atomic_write_text(output_dir / "results.md", markdown)
    figure = accuracy_energy_figure(public, title)
    save_figure(figure, output_dir / "results.png")
    writer = SummaryWriter(log_dir=str(output_dir))
    try:
        log_evaluation(writer, rows, figure, table + "\n" + legend)
    finally:
        writer.close()
        plt.close(figure)
    print(
        table
        + "\n"
        + legend
        + ("\n\nPer MoE layer:\n" + layers if layers else "")
        + ("\nFrontier:\n" + frontier if frontier else ""),
        file=sys.stdout,
        flush=True,
    )


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
