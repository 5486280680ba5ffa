"""One accuracy-vs-energy curve per policy family, iso-accuracy summaries and paired-bootstrap
intervals (evaluate.py's frontier.csv, results.md's Frontier section, frontier.png; and
scripts/frontier.py, which merges several evaluation runs).

**Family.**  The rows of one routing policy form a family: ``topk@1`` and ``topk@2`` are
family ``topk``; des, jesa and greedy sweep gamma, lagrangian sweeps lambda.  Rows planned
for an outage target (imperfect CSI) are a family of their own, e.g. ``jesa target 5%``.
The points of a family's curve are its rows, by energy.

**Curve rule (the upper envelope).**  A family's accuracy need not grow with its energy (a
larger gamma may buy nothing, or lose a little to outages).  The curve is the upper
envelope: a point that costs at least as much energy as a cheaper point of its family and
is no more accurate is dropped (:func:`dmoe_torch.stats.pareto_front`), and the kept points
are joined by straight lines.  A straight line between two settings is attainable: run one
on a share p of the images and the other on the rest, and accuracy and energy are both
mixed in the ratio p.  The curve spans the family's energies [cheapest, dearest] and is flat
after its most accurate point; it is never extrapolated.  So the *iso-accuracy energy* of a
family (:func:`iso_accuracy_energy`) is the energy at which this curve first reaches the
target accuracy: the cheapest energy when its cheapest setting already does, nan when no
setting does; and :func:`accuracy_at_energy` is the curve's accuracy at an energy, nan
outside its span.

**Paired bootstrap.**  Every setting was evaluated on the same test images and the same
channel draws, and its per-image correctness and energy are kept aligned by image index
(``EvalTotals.per_image``).  As in :mod:`dmoe_torch.stats`, the image (with its D channel
draws, averaged) is the independent unit.  One resample draws n image indices with
replacement, the same for every setting at once, and recomputes every setting's accuracy and
energy; the target (the reference's accuracy minus ``drop_pp``), the anchor's energy and
every family's curve are recomputed from them.  The 95% interval is the 2.5 / 97.5 percentile
of the resamples; a resample whose curve never reaches the target counts as an infinite
energy (an interval ending in ``inf``: not reached in more than 2.5% of the resamples).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write, atomic_write_text
from .plots import target_text
from .report import REFERENCE_POLICY, format_gamma, read_results_csv, save_figure

PER_IMAGE_FILE = "per_image.npz"  # per-image correctness and energy of every setting of a run
FRONTIER_CSV = "frontier.csv"
FRONTIER_PNG = "frontier.png"
DEFAULT_ANCHOR = ("jesa", 0.25)  # (policy label, gamma): the setting whose energy the families are compared at
DEFAULT_DROP_PP = 0.5  # target accuracy = the reference's minus this many percentage points
DEFAULT_RESAMPLES = 1000
CI_QUANTILES = (0.025, 0.975)

# Columns of frontier.csv, in order.  Accuracies are fractions (0.01 = 1 pp), energies µJ per
# image summed over all MoE layers, as in results.csv; *_lo / *_hi: the 95% paired-bootstrap interval.
FRONTIER_COLUMNS = (
    "family",
    "settings",
    "energy_min_uj",
    "energy_max_uj",
    "accuracy_max",
    "iso_energy_uj",
    "iso_energy_uj_lo",
    "iso_energy_uj_hi",
    "iso_at_cheapest",
    "iso_reached_share",
    "iso_energy_vs_reference",
    "iso_energy_vs_reference_lo",
    "iso_energy_vs_reference_hi",
    "anchor_accuracy",
    "anchor_accuracy_lo",
    "anchor_accuracy_hi",
    "anchor_accuracy_diff",
    "anchor_accuracy_diff_lo",
    "anchor_accuracy_diff_hi",
    "anchor_defined_share",
    "reference",
    "drop_pp",
    "target_accuracy",
    "target_accuracy_lo",
    "target_accuracy_hi",
    "anchor",
    "anchor_energy_uj",
    "anchor_energy_uj_lo",
    "anchor_energy_uj_hi",
    "resamples",
    "inputs",
    "draws",
)


# ---------------------------------------------------------------------------------------------
# Families and curves


def family_of(row: dict[str, Any]) -> str:
    """``"topk@2"`` -> ``"topk"``; ``"jesa"`` planned for a 5% outage target -> ``"jesa target 5%"``."""
    return " ".join(filter(None, (str(row["policy"]).split("@")[0], target_text(row))))


def family_curves(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Results rows grouped by :func:`family_of`, families in first-seen order, each family's
    rows sorted by energy (``energy_uj_mean``)."""
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(family_of(row), []).append(row)
    return {name: sorted(group, key=lambda r: r["energy_uj_mean"]) for name, group in families.items()}


def _sorted_points(curve_points: Any) -> tuple[np.ndarray, np.ndarray]:
    """(energy, accuracy), each float64 [..., P], sorted by energy along the last axis."""
    points = np.asarray(curve_points, dtype=np.float64)
    if points.ndim < 2 or points.shape[-1] != 2 or points.shape[-2] == 0:
        raise ValueError(f"curve_points: shape {points.shape}; must be [..., P, 2] (energy, accuracy) pairs with P >= 1")
    if not np.isfinite(points).all():
        raise ValueError("curve_points: every energy and accuracy must be finite")
    order = np.argsort(points[..., 0], axis=-1, kind="stable")
    return np.take_along_axis(points[..., 0], order, -1), np.take_along_axis(points[..., 1], order, -1)


def _pick(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values [..., P] at index [...] -> [...]."""
    return np.take_along_axis(values, index[..., None], -1)[..., 0]


def _scalar_or_array(values: np.ndarray) -> np.ndarray | float:
    return float(values) if values.ndim == 0 else values


def iso_accuracy_energy(curve_points: Any, target_acc: Any) -> np.ndarray | float:
    """Energy at which a family's curve (upper envelope, module docstring) first reaches
    ``target_acc``.

    curve_points  [..., P, 2] float  (energy µJ, accuracy) of the P settings of a family, any
                                     order; leading dimensions are independent curves (resamples)
    target_acc    [...] float        target accuracy, broadcast against the curves

    Returns [...] float64 µJ (a float for one curve): the energy of the cheapest point when it
    already reaches the target, else the linear interpolation between the first point that
    reaches it and the most accurate cheaper point (the previous envelope point); nan when no
    point reaches it (or the target is nan).
    """
    energy, accuracy = _sorted_points(curve_points)
    target = np.asarray(target_acc, dtype=np.float64)[..., None]
    energy, accuracy, target = np.broadcast_arrays(energy, accuracy, target)
    reaches = accuracy >= target
    first = np.argmax(reaches, axis=-1)  # the first point that reaches it is on the envelope
    before = np.arange(energy.shape[-1]) < first[..., None]
    previous = np.argmax(np.where(before, accuracy, -np.inf), axis=-1)  # first of the best cheaper: the envelope point
    e0, a0 = _pick(energy, previous), _pick(accuracy, previous)
    e1, a1 = _pick(energy, first), _pick(accuracy, first)
    rise = np.where(first > 0, a1 - a0, 1.0)  # > 0 wherever used: a0 < target <= a1
    interpolated = e0 + (target[..., 0] - a0) / rise * (e1 - e0)
    result = np.where(first > 0, interpolated, e1)
    return _scalar_or_array(np.where(reaches.any(axis=-1), result, math.nan))


def accuracy_at_energy(curve_points: Any, energy_uj: Any) -> np.ndarray | float:
    """Accuracy of a family's curve (upper envelope, module docstring) at ``energy_uj``.

    curve_points  [..., P, 2] float  (energy µJ, accuracy) of the P settings, any order
    energy_uj     [...] float        the energy (µJ), broadcast against the curves

    Returns [...] float64 accuracy (a float for one curve): linear between the two envelope
    points around the energy, the best accuracy of the cheaper points after the most accurate
    point; nan below the cheapest or above the dearest point (or for a nan energy).
    """
    energies, accuracy = _sorted_points(curve_points)
    at = np.asarray(energy_uj, dtype=np.float64)[..., None]
    energies, accuracy, at = np.broadcast_arrays(energies, accuracy, at)
    affordable = energies <= at
    previous = np.argmax(np.where(affordable, accuracy, -np.inf), axis=-1)  # the envelope point at or below
    e0, a0 = _pick(energies, previous), _pick(accuracy, previous)
    better = ~affordable & (accuracy > a0[..., None])
    following = np.argmax(better, axis=-1)  # the next envelope point, when one is dearer and better
    e1, a1 = _pick(energies, following), _pick(accuracy, following)
    span = np.where(better.any(axis=-1), e1 - e0, 1.0)  # > 0 wherever used: e0 <= energy < e1
    value = np.where(better.any(axis=-1), a0 + (at[..., 0] - e0) / span * (a1 - a0), a0)
    inside = (at[..., 0] >= energies[..., 0]) & (at[..., 0] <= energies[..., -1])
    return _scalar_or_array(np.where(inside, value, math.nan))


# ---------------------------------------------------------------------------------------------
# Per-image data and the paired bootstrap


def stack_per_image(per_image: Sequence[Sequence[dict]]) -> dict[str, np.ndarray]:
    """Evaluation's per-image results (per setting, per draw: ``EvalTotals.per_image()``) as
    arrays: ``correct`` bool [S, D, n] and ``energy_uj`` float64 [S, D, n] (µJ per image,
    all tokens and MoE layers), aligned by setting, draw and image index."""
    if not per_image or not all(per_image):
        raise ValueError("per_image: must hold the per-draw results of at least one setting")
    correct = np.stack([np.stack([np.asarray(d["correct"], dtype=bool) for d in draws]) for draws in per_image])
    energy = np.stack([np.stack([np.asarray(d["energy_uj"], dtype=np.float64) for d in draws]) for draws in per_image])
    return {"correct": correct, "energy_uj": energy}


def _check_per_image(rows: Sequence[dict], per_image: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    correct = np.asarray(per_image.get("correct"))
    energy = np.asarray(per_image.get("energy_uj"), dtype=np.float64)
    if correct.ndim != 3 or correct.shape != energy.shape or correct.shape[0] != len(rows) or correct.shape[2] == 0:
        raise ValueError(
            f"per_image: correct {correct.shape} and energy_uj {energy.shape} must both be "
            f"[settings={len(rows)}, draws, images >= 1], one setting per results row"
        )
    return correct, energy


def bootstrap_means(scores: np.ndarray, resamples: int, seed: int, chunk: int = 128) -> np.ndarray:
    """Means of per-image scores over images resampled with replacement, the same images for
    every score (paired).

    scores     [C, n] float64  per-image scores (e.g. accuracy and energy of every setting,
                               averaged over the draws)
    Returns [resamples, C] float64; resample r is a pure function of (seed, r, n).
    """
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: must be >= 1")
    rng = np.random.default_rng(seed)
    columns, n = scores.shape
    means = np.empty((resamples, columns))
    for start in range(0, resamples, chunk):  # a chunk of resamples at a time bounds the memory (chunk x n counts)
        count = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(count, n)) + n * np.arange(count)[:, None]
        weights = np.bincount(picks.ravel(), minlength=count * n).reshape(count, n)  # times each image was drawn
        means[start : start + count] = weights @ scores.T / n
    return means


def _interval(values: np.ndarray, unreached: np.ndarray | None = None) -> tuple[float, float]:
    """2.5 / 97.5 percentiles (order statistics) of the resampled values [R]; a nan counts as
    +inf where ``unreached`` [R] bool is set (an iso energy never reached), else is left out
    (an undefined value)."""
    if unreached is not None:
        values = np.where(unreached, math.inf, values)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, CI_QUANTILES, method="inverted_cdf")
    return float(low), float(high)


def _find_row(rows: Sequence[dict], policy: str, gamma: Any = None) -> int | None:
    """Index of the row of ``policy`` (its label, e.g. topk@2) at ``gamma`` without an outage target."""
    wanted = format_gamma(gamma)
    for index, row in enumerate(rows):
        if row["policy"] == policy and (gamma is None or row["gamma"] == wanted) and not target_text(row):
            return index
    return None


def anchor_label(anchor: tuple[str, Any] | None) -> str:
    """``("jesa", 0.25)`` -> ``"jesa γ 0.25"``."""
    if anchor is None:
        return ""
    policy, gamma = anchor
    return f"{policy} γ {format_gamma(gamma)}" if gamma is not None else policy


def frontier_summary(
    rows: Sequence[dict[str, Any]],
    per_image: dict[str, np.ndarray],
    reference: str = REFERENCE_POLICY,
    drop_pp: float = DEFAULT_DROP_PP,
    anchor: tuple[str, Any] | None = DEFAULT_ANCHOR,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One summary row per policy family (:func:`family_curves` order); columns FRONTIER_COLUMNS.

    rows       results rows (``policy``, ``gamma``, ``outage_target``, ...), S of them
    per_image  ``correct`` bool [S, D, n] and ``energy_uj`` float64 [S, D, n] (µJ), row i of
               the results in setting i, the same images and channel draws in every setting
    reference  the policy label whose accuracy minus ``drop_pp`` percentage points is the
               target; anchor: (policy label, gamma) whose energy the families are compared at

    Point estimates are on all images (equal to the rows' accuracy_mean / energy_uj_mean up to
    rounding); intervals from ``resamples`` paired bootstrap resamples (module docstring).  An
    absent reference (anchor) leaves the iso (anchor) columns nan.
    """
    correct, energy = _check_per_image(rows, per_image)
    if not (math.isfinite(drop_pp) and drop_pp >= 0):
        raise ValueError(f"drop_pp={drop_pp}: must be a finite number of percentage points >= 0")
    S, D, n = correct.shape
    scores = np.concatenate([correct.mean(axis=1), energy.mean(axis=1)])  # [2S, n]: per image, averaged over draws
    means = np.concatenate([scores.mean(axis=1)[None], bootstrap_means(scores, resamples, seed)])  # [1 + R, 2S]: row 0 all images
    accuracy, energy_uj = means[:, :S], means[:, S:]
    reference_index = _find_row(rows, reference)
    anchor_index = None if anchor is None else _find_row(rows, *anchor)
    nan = np.full(len(means), math.nan)
    target = nan if reference_index is None else accuracy[:, reference_index] - drop_pp / 100
    anchor_energy = nan if anchor_index is None else energy_uj[:, anchor_index]
    anchor_accuracy = nan if anchor_index is None else accuracy[:, anchor_index]
    indices: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        indices.setdefault(family_of(row), []).append(index)
    shared = {
        "reference": reference,
        "drop_pp": drop_pp,
        "target_accuracy": float(target[0]),
        "anchor": anchor_label(anchor),
        "anchor_energy_uj": float(anchor_energy[0]),
        "resamples": resamples,
        "inputs": n,
        "draws": D,
    }
    shared["target_accuracy_lo"], shared["target_accuracy_hi"] = _interval(target[1:])
    shared["anchor_energy_uj_lo"], shared["anchor_energy_uj_hi"] = _interval(anchor_energy[1:])
    summary = []
    for family, members in indices.items():
        curves = np.stack([energy_uj[:, members], accuracy[:, members]], axis=-1)  # [1 + R, P, 2]
        iso = np.asarray(iso_accuracy_energy(curves, target))
        iso_share = iso / (energy_uj[:, reference_index] if reference_index is not None else nan)
        at_anchor = np.asarray(accuracy_at_energy(curves, anchor_energy))
        diff = at_anchor - anchor_accuracy
        row = {
            "family": family,
            "settings": len(members),
            "energy_min_uj": float(curves[0, :, 0].min()),
            "energy_max_uj": float(curves[0, :, 0].max()),
            "accuracy_max": float(curves[0, :, 1].max()),
        }
        unreached = np.isnan(iso[1:]) & np.isfinite(target[1:])  # a target no setting reaches: infinite energy
        for name, values, infinite in (
            ("iso_energy_uj", iso, True),
            ("iso_energy_vs_reference", iso_share, True),
            ("anchor_accuracy", at_anchor, False),
            ("anchor_accuracy_diff", diff, False),
        ):
            row[name] = float(values[0])
            row[f"{name}_lo"], row[f"{name}_hi"] = _interval(values[1:], unreached if infinite else None)
        cheapest = int(np.argmin(curves[0, :, 0]))
        row["iso_at_cheapest"] = bool(curves[0, cheapest, 1] >= target[0])  # the true crossing may lie below
        row["iso_reached_share"] = float(np.mean(~np.isnan(iso[1:]))) if reference_index is not None else math.nan
        row["anchor_defined_share"] = float(np.mean(~np.isnan(at_anchor[1:])))
        summary.append({**row, **shared})
    return [{column: row[column] for column in FRONTIER_COLUMNS} for row in summary]


# ---------------------------------------------------------------------------------------------
# Tables


def frontier_csv(summary: Sequence[dict[str, Any]]) -> str:
    """frontier.csv: FRONTIER_COLUMNS; nan -> empty, +inf -> ``inf`` (never reached)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FRONTIER_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in summary:
        writer.writerow(
            {
                key: (
                    "" if isinstance(value, float) and math.isnan(value) else repr(value) if isinstance(value, float) else value
                )
                for key, value in row.items()
            }
        )
    return buffer.getvalue()


def _energy_text(value: float) -> str:
    return "n/a" if math.isnan(value) else "∞" if math.isinf(value) else f"{value:.2f}"


def _interval_cell(point: float, low: float, high: float, fmt) -> str:
    if math.isnan(point) and math.isnan(low):
        return "n/a"
    return f"{fmt(point)} [{fmt(low)}, {fmt(high)}]"


def frontier_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The Frontier table (one row per family) with a line saying what the target and the
    anchor are, and a legend under it; "" for an empty summary."""
    if not summary:
        return ""
    first = summary[0]
    percent = lambda v: "n/a" if math.isnan(v) else "∞" if math.isinf(v) else f"{100 * v:.2f}"  # noqa: E731
    signed = lambda v: "n/a" if math.isnan(v) else f"{100 * v:+.2f}"  # noqa: E731
    share = lambda v: "n/a" if math.isnan(v) else "∞" if math.isinf(v) else f"{100 * v:.0f}%"  # noqa: E731
    reference, anchor = first["reference"], first["anchor"] or "no anchor"
    target = _interval_cell(first["target_accuracy"], first["target_accuracy_lo"], first["target_accuracy_hi"], percent)
    anchor_energy = _interval_cell(
        first["anchor_energy_uj"], first["anchor_energy_uj_lo"], first["anchor_energy_uj_hi"], _energy_text
    )
    lines = [
        f"Target: {reference} accuracy − {first['drop_pp']:g} pp = "
        + (f"{target} %" if math.isfinite(first["target_accuracy"]) else f"n/a ({reference} was not evaluated)")
        + f"; anchor: {anchor} at "
        + (f"{anchor_energy} µJ/image." if math.isfinite(first["anchor_energy_uj"]) else "n/a (not evaluated)."),
        "",
        f"| family | settings | energy range µJ | energy at target µJ [95% CI] | vs {reference} energy [95% CI] "
        f"| reached in | accuracy % at {anchor}'s energy [95% CI] | vs {anchor} pp [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        iso = _interval_cell(row["iso_energy_uj"], row["iso_energy_uj_lo"], row["iso_energy_uj_hi"], _energy_text)
        if row["iso_at_cheapest"]:
            iso = "≤ " + iso  # reached at the family's cheapest setting: the crossing may lie below it
        cells = (
            row["family"],
            str(row["settings"]),
            f"{row['energy_min_uj']:.2f} – {row['energy_max_uj']:.2f}",
            iso,
            _interval_cell(
                row["iso_energy_vs_reference"], row["iso_energy_vs_reference_lo"], row["iso_energy_vs_reference_hi"], share
            ),
            share(row["iso_reached_share"]),
            _interval_cell(row["anchor_accuracy"], row["anchor_accuracy_lo"], row["anchor_accuracy_hi"], percent)
            + (
                ""
                if row["anchor_defined_share"] in (1.0,) or math.isnan(row["anchor_accuracy"])
                else f" (in {100 * row['anchor_defined_share']:.0f}%)"
            ),
            _interval_cell(row["anchor_accuracy_diff"], row["anchor_accuracy_diff_lo"], row["anchor_accuracy_diff_hi"], signed),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\n"
        + FRONTIER_LEGEND.format(resamples=first["resamples"], inputs=first["inputs"], draws=first["draws"])
        + "\n"
    )


FRONTIER_LEGEND = (
    "A family is the rows of one policy (topk@1 and topk@2: topk; des / jesa / greedy over gamma; lagrangian over "
    "lambda); its curve is the upper envelope of its points by energy (a point no more accurate than a cheaper one "
    "is dropped), linear between them and never extrapolated. Energy at target: where the curve first reaches the "
    "target (≤: its cheapest setting already does; n/a: never); vs reference energy: that energy over the "
    "reference's; reached in: the share of bootstrap resamples in which the curve reaches the target. Accuracy at the "
    "anchor's energy: the curve's value there (n/a outside the family's energy range). Intervals: 2.5-97.5 percentiles "
    "of {resamples} paired bootstrap resamples of the {inputs} test images (each with its {draws} channel draw(s)), the "
    "same images for every setting; ∞: not reached in more than 2.5% of the resamples."
)


# ---------------------------------------------------------------------------------------------
# Files: per_image.npz, frontier.csv / .png, merging the runs of several checkpoints


def save_per_image(path: str | Path, rows: Sequence[dict[str, Any]], per_image: dict[str, np.ndarray]) -> Path:
    """Write ``per_image.npz`` (compressed, atomically): ``correct`` bool [S, D, n],
    ``energy_uj`` float64 [S, D, n] (µJ per image) and, to match them with results.csv,
    ``policy`` and ``gamma`` str [S] of the S results rows in order."""
    correct, energy = _check_per_image(rows, per_image)
    arrays = {
        "correct": correct,
        "energy_uj": energy,
        "policy": np.array([str(r["policy"]) for r in rows]),
        "gamma": np.array([str(r["gamma"]) for r in rows]),
    }
    return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def load_run(
    run_dir: str | Path, prefix: str = "", families: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The results rows and per-image arrays of an evaluate.py run directory (results.csv and
    per_image.npz), the policy labels prefixed with ``prefix`` (``learned_`` makes topk@2
    ``learned_topk@2``, of family ``learned_topk``); ``families``: keep only these (unprefixed)."""
    run_dir = Path(run_dir)
    for name in ("results.csv", PER_IMAGE_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(f"run {str(run_dir)!r}: no {name}; evaluate.py writes it (rerun it on this checkpoint)")
    rows = read_results_csv(run_dir / "results.csv")
    with np.load(run_dir / PER_IMAGE_FILE, allow_pickle=False) as data:
        arrays = {key: data[key] for key in ("correct", "energy_uj", "policy", "gamma")}
    if [(r["policy"], r["gamma"]) for r in rows] != list(zip(arrays["policy"].tolist(), arrays["gamma"].tolist(), strict=True)):
        raise ValueError(f"run {str(run_dir)!r}: results.csv and {PER_IMAGE_FILE} list different settings (from different runs)")
    present = list(dict.fromkeys(family_of(r) for r in rows))
    unknown = [f for f in families or () if f not in present]
    if unknown:
        raise ValueError(f"run {str(run_dir)!r}: no family {', '.join(unknown)}; it has {', '.join(present)}")
    keep = [i for i, r in enumerate(rows) if families is None or family_of(r) in families]
    rows = [{**rows[i], "policy": prefix + str(rows[i]["policy"])} for i in keep]
    return rows, {"correct": arrays["correct"][keep], "energy_uj": arrays["energy_uj"][keep]}


def _same(a: Any, b: Any) -> bool:
    nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    return a == b or (nan(a) and nan(b))


def merge_runs(
    runs: Sequence[tuple[str, list[dict[str, Any]], dict[str, np.ndarray]]],
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Concatenate the (name, rows, per_image) of several runs into one set of settings for a
    paired :func:`frontier_summary`.  The runs must share the test images and channel draws
    (the same images, draws, seed and channel.* columns) and their families must differ."""
    if not runs:
        raise ValueError("runs: give at least one run")
    first_name, first_rows, first_images = runs[0]
    families = {family_of(r): first_name for r in first_rows}
    for name, rows, images in runs[1:]:
        if images["correct"].shape[1:] != first_images["correct"].shape[1:]:
            draws, n = images["correct"].shape[1:]
            raise ValueError(
                f"run {name!r}: {n} images x {draws} draws, run {first_name!r} "
                f"{first_images['correct'].shape[2]} x {first_images['correct'].shape[1]}; evaluate both "
                f"with the same data.limit_test and eval.channel_draws"
            )
        keys = [k for k in first_rows[0] if k == "seed" or k.startswith("channel.")] if first_rows and rows else []
        differ = [k for k in keys if not _same(first_rows[0][k], rows[0].get(k))]
        if differ:
            raise ValueError(
                f"run {name!r}: {', '.join(differ)} differ from run {first_name!r}; the runs must share the "
                f"channel draws (evaluate with the same seed and channel)"
            )
        clash = sorted({family_of(r) for r in rows} & set(families))
        if clash:
            raise ValueError(
                f"run {name!r}: families {', '.join(clash)} are also in run {families[clash[0]]!r}; give it a prefix (DIR:PREFIX)"
            )
        families.update({family_of(r): name for r in rows})
    rows = [row for _, run_rows, _ in runs for row in run_rows]
    return rows, {key: np.concatenate([images[key] for _, _, images in runs]) for key in ("correct", "energy_uj")}


def write_frontier(
    rows: Sequence[dict[str, Any]], per_image: dict[str, np.ndarray], output_dir: str | Path, *, title: str = "", **options: Any
) -> tuple[list[dict[str, Any]], str]:
    """:func:`frontier_summary` (``options``: its keyword arguments) written to frontier.csv,
    and the curves to frontier.png, in ``output_dir``; returns (summary, its markdown table)."""
    from .plots import frontier_figure, pyplot

    output_dir = Path(output_dir)
    summary = frontier_summary(rows, per_image, **options)
    atomic_write_text(output_dir / FRONTIER_CSV, frontier_csv(summary))
    figure = frontier_figure(family_curves(rows), summary, title)
    try:
        save_figure(figure, output_dir / FRONTIER_PNG)
    finally:
        pyplot().close(figure)
    return summary, frontier_markdown(summary)
