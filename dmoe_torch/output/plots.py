"""Matplotlib helpers: the accuracy-vs-energy plot of an evaluation and point labels that do
not overlap.  Everything draws on the Agg backend (no display needed), and matplotlib is only
imported when a figure is drawn.  :func:`target_text`, the label of a row's outage target, is
here because the plots and the result tables (:mod:`dmoe_torch.output.report`, which imports this
module) both use it."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import stats

# Candidate label offsets (points) around a marker, nearest first: right, above, left, below,
# then the diagonals, at growing distances.
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
_RADII = (5, 11, 18, 28)
MARKER_PX = 5.0  # half-size of the box kept free around every marker


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def policy_colors(labels: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per policy label (same colour in every panel and figure)."""
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = sorted(set(labels), key=lambda s: (s.split("@")[0] not in ("topk", "none"), s))
    return {label: cycle[i % len(cycle)] for i, label in enumerate(order)}


def place_labels(
    axes,
    anchors: Sequence[tuple[float, float]],
    texts: Sequence[str],
    *,
    avoid: Sequence[tuple[float, float]] = (),
    fontsize: float = 7.0,
) -> list:
    """Annotate ``anchors`` (data coordinates) with ``texts`` so that no two labels overlap
    each other, a marker in ``avoid`` or the axes' border: greedy, nearest free candidate
    position first; a label with no free position is left out.  Call after the final layout
    (tight_layout), since positions are measured on the canvas.  Returns the annotations."""
    from matplotlib.transforms import Bbox

    figure = axes.figure
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    occupied = []
    for x, y in list(avoid) + list(anchors):
        px, py = axes.transData.transform((x, y))
        occupied.append(Bbox.from_extents(px - MARKER_PX, py - MARKER_PX, px + MARKER_PX, py + MARKER_PX))
    legend = axes.get_legend()
    for artist in list(axes.texts) + ([legend] if legend is not None else []):  # e.g. the floor's text
        occupied.append(artist.get_window_extent(renderer))
    placed = []
    for (x, y), text in zip(anchors, texts, strict=True):
        for radius in _RADII:
            done = False
            for dx, dy in _DIRECTIONS:
                scale = radius / math.hypot(dx, dy)
                annotation = axes.annotate(
                    text,
                    (x, y),
                    xytext=(dx * scale, dy * scale),
                    textcoords="offset points",
                    fontsize=fontsize,
                    ha="left" if dx > 0 else "right" if dx < 0 else "center",
                    va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if radius >= 18 else None,
                    bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.75),
                )
                box = annotation.get_window_extent(renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(other) for other in occupied):
                    occupied.append(box)
                    placed.append(annotation)
                    done = True
                    break
                annotation.remove()
            if done:
                break
    return placed


def target_text(row: dict[str, Any]) -> str:
    """ "" for a row without an outage target, else e.g. "target 5%"."""
    try:
        target = float(row.get("outage_target", math.nan))
    except (TypeError, ValueError):  # "" (no target) as written by summarise_draws
        return ""
    return f"target {100 * target:g}%" if math.isfinite(target) else ""


def _is_per_layer(gamma: str) -> bool:
    return gamma.startswith("[")


def _low_fence(values: Sequence[float]) -> float:
    """Tukey's lower fence q1 - 1.5 IQR: accuracies below it are outliers of the plot."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q1 - 1.5 * (q3 - q1))


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _draw_points(axes, points: list[dict], colors: dict, *, legend: bool) -> list[tuple[float, float, str]]:
    """Errorbar series per policy: scalar gammas joined by a line, per-layer gamma lists as
    separate diamonds (not a continuum).  Returns (energy, accuracy, label) of points to label."""
    to_label = []
    series: dict[tuple[str, bool, str], list[dict]] = {}
    for row in points:
        series.setdefault((row["policy"], _is_per_layer(row["gamma"]), target_text(row)), []).append(row)
    for (policy, per_layer, target), group in series.items():
        group = sorted(group, key=lambda r: r["energy_uj_mean"])
        axes.errorbar(
            [r["energy_uj_mean"] for r in group],
            [r["accuracy_mean"] for r in group],
            xerr=[_finite(r.get("energy_uj_ci95")) for r in group],
            yerr=[_finite(r.get("accuracy_ci95")) for r in group],
            marker="D" if per_layer else "o",
            markersize=4,
            capsize=2,
            elinewidth=0.8,
            color=colors[policy],
            linestyle="none" if per_layer or len(group) == 1 else "--" if target else "-",
            linewidth=1.2,
            label=" ".join(filter(None, (policy, "(per-layer γ)" if per_layer else "", target))) if legend else None,
        )
        to_label.extend((r["energy_uj_mean"], r["accuracy_mean"], r["gamma"]) for r in group if r["gamma"])
    return to_label


def _energy_axis(axes, energies: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    axes.set_xscale("log")
    low, high = min(energies), max(energies)
    axes.set_xlim(low / 1.6, high * 1.6)  # the data's decades, not matplotlib's padding to whole decades
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=30))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    axes.set_xlabel("transmission energy per image (µJ, summed over all MoE layers)")


def _draw_floors(axes, floors: list[dict]) -> None:
    for row in floors:
        axes.axhline(row["accuracy_mean"], linestyle="--", color="0.35", linewidth=1.0)
        axes.annotate(
            f"{row['policy']}: every expert bypassed, 0 µJ ({100 * row['accuracy_mean']:.1f}%)",
            (0.01, row["accuracy_mean"]),
            xycoords=("axes fraction", "data"),
            xytext=(0, 2),
            textcoords="offset points",
            fontsize=7,
            color="0.25",
            va="bottom",
        )


def pareto_rows(rows: list[dict]) -> list[dict]:
    """The rows on the Pareto front, by energy; a zero-energy floor (none) is on it and
    removes every point it beats."""
    front = stats.pareto_front([r["energy_uj_mean"] for r in rows], [r["accuracy_mean"] for r in rows])
    return [rows[i] for i in front]


def _draw_pareto(axes, points: list[dict], floors: list[dict]) -> None:
    front = [r for r in pareto_rows(points + floors) if r["energy_uj_mean"] > 0]
    x = [p["energy_uj_mean"] for p in front]
    y = [p["accuracy_mean"] for p in front]
    axes.step(x, y, where="post", color="black", linestyle=":", linewidth=1.0, zorder=1)
    axes.plot(
        x,
        y,
        linestyle="none",
        marker="o",
        markersize=10,
        markerfacecolor="none",
        markeredgecolor="black",
        markeredgewidth=0.8,
        label="Pareto front",
        zorder=1,
    )


def accuracy_energy_figure(rows: list[dict[str, Any]], title: str = "", *, pareto: bool = False):
    """Accuracy vs. energy per image (log axis), one colour per policy, 95% interval bars.

    Rows with zero energy (policy ``none``) are horizontal dashed floors, since 0 is not on a
    log axis.  When some accuracies are outliers (below Tukey's fence q1 - 1.5 IQR, e.g.
    channel_topk or the floor), a second panel zooms on the others, so one outlier does not
    squash every other policy into a thin band; gamma labels go where they overlap nothing.
    ``pareto``: mark the points no other point beats on both axes.
    """
    plt = pyplot()
    points = [r for r in rows if r["energy_uj_mean"] > 0]
    floors = [r for r in rows if r["energy_uj_mean"] <= 0]
    colors = policy_colors([r["policy"] for r in rows])
    accuracies = [r["accuracy_mean"] for r in points]
    fence = _low_fence(accuracies) if len(points) >= 4 else -math.inf
    focus = [r for r in points if r["accuracy_mean"] >= fence]
    outliers = [r for r in points if r["accuracy_mean"] < fence]
    zoom = bool(points) and (bool(outliers) or any(f["accuracy_mean"] < fence for f in floors))
    figure, panels = plt.subplots(1, 2 if zoom else 1, figsize=(13.0 if zoom else 8.0, 5.2), squeeze=False)
    panels = list(panels[0])
    for axes in panels:
        axes.set_ylabel("test accuracy")
        axes.grid(True, which="both", alpha=0.3)
    if not points:  # nothing on the log axis
        _draw_floors(panels[0], floors)
        panels[0].set_xlabel("transmission energy per image (µJ, summed over all MoE layers)")
        figure.tight_layout()
        return figure
    overview, detail = panels[0], panels[-1]
    energies = [r["energy_uj_mean"] for r in points]
    if zoom:
        _draw_points(overview, points, colors, legend=False)
        _draw_floors(overview, floors)
        _energy_axis(overview, energies)
        overview.set_title("all policies", fontsize=9)
    to_label = _draw_points(detail, focus, colors, legend=True)
    _energy_axis(detail, energies)
    if pareto:
        _draw_pareto(detail, focus, floors)
    if zoom:
        span = [r["accuracy_mean"] + s * _finite(r.get("accuracy_ci95")) for r in focus for s in (-1, 1)]
        pad = 0.08 * (max(span) - min(span) or 0.01)
        detail.set_ylim(min(span) - pad, max(span) + pad)
        overview.axhspan(min(span) - pad, max(span) + pad, color="tab:blue", alpha=0.06, linewidth=0)
        below = [f"{r['policy']} {r['gamma']}".strip() + f" ({100 * r['accuracy_mean']:.1f}%)" for r in outliers + floors]
        detail.set_title("zoom (shaded band at left); below: " + ", ".join(below), fontsize=8)
        _draw_floors(detail, [f for f in floors if f["accuracy_mean"] >= min(span) - pad])
    else:
        _draw_floors(detail, floors)
    detail.legend(fontsize=8, loc="best", title="labels: γ", title_fontsize=8)
    if title:  # wrapped to the figure's width (about 15 characters per inch at this size)
        figure.suptitle(textwrap.fill(title, width=int(15 * figure.get_figwidth())), fontsize=9)
    figure.tight_layout()
    place_labels(
        detail,
        [(x, y) for x, y, _ in to_label],
        [t for _, _, t in to_label],
        avoid=[(r["energy_uj_mean"], r["accuracy_mean"]) for r in focus],
    )
    return figure


def _envelope(group: list[dict]) -> tuple[list[float], list[float]]:
    """The upper envelope of a family's points (dmoe_torch.output.frontier): its Pareto points, then
    flat to its dearest point."""
    energy = [r["energy_uj_mean"] for r in group]
    accuracy = [r["accuracy_mean"] for r in group]
    front = stats.pareto_front(energy, accuracy)
    x, y = [energy[i] for i in front], [accuracy[i] for i in front]
    if max(energy) > x[-1]:
        x.append(max(energy))
        y.append(y[-1])
    return x, y


def _forest(
    axes, summary: list[dict[str, Any]], colors: dict, name: str, *, scale: float = 1.0, limits: tuple[float, float] | None = None
) -> None:
    """One row per family: ``name`` with its 95% bootstrap interval (columns ``name``,
    ``name_lo``, ``name_hi``), clipped to ``limits``; "n/a" where undefined."""
    low, high = limits if limits is not None else axes.get_xlim()
    for position, row in enumerate(summary):
        y = len(summary) - 1 - position
        value, left, right = (scale * row[name], scale * row[f"{name}_lo"], scale * row[f"{name}_hi"])
        color = colors[row["family"]]
        if math.isfinite(left):
            axes.plot([max(left, low), min(right, high)], [y, y], color=color, linewidth=2.0, solid_capstyle="butt")
        if math.isfinite(value):
            marker = "<" if name == "iso_energy_uj" and row["iso_at_cheapest"] else "o"
            axes.plot([value], [y], marker=marker, markersize=6, color=color)
        elif not math.isfinite(left):
            axes.annotate("n/a", (0.99, y), xycoords=("axes fraction", "data"), ha="right", va="center", fontsize=7)
    axes.set_yticks(range(len(summary)), [row["family"] for row in reversed(summary)], fontsize=8)
    axes.set_ylim(-0.7, len(summary) - 0.3)
    axes.set_xlim(low, high)
    axes.grid(True, axis="x", which="both", alpha=0.3)


def _draw_families(axes, points: dict, floors: list[dict], colors: dict, energies: list[float], first: dict) -> None:
    """One accuracy-energy panel of :func:`frontier_figure`: each family's settings with their
    intervals and its upper envelope, the floors, the anchor's energy and the target accuracy."""
    target = float(first.get("target_accuracy", math.nan))
    anchor_energy = float(first.get("anchor_energy_uj", math.nan))
    axes.set_ylabel("test accuracy")
    axes.grid(True, which="both", alpha=0.3)
    _draw_floors(axes, floors)
    for family, group in points.items():
        axes.errorbar(
            [r["energy_uj_mean"] for r in group],
            [r["accuracy_mean"] for r in group],
            xerr=[_finite(r.get("energy_uj_ci95")) for r in group],
            yerr=[_finite(r.get("accuracy_ci95")) for r in group],
            marker="o",
            markersize=4,
            capsize=2,
            elinewidth=0.8,
            linestyle="none",
            color=colors[family],
        )
        x, y = _envelope(group)
        axes.plot(x, y, color=colors[family], linewidth=1.3, label=family)
    if energies:
        _energy_axis(axes, energies)
    if math.isfinite(anchor_energy):
        axes.axvline(anchor_energy, color="0.4", linestyle=":", linewidth=1.0, label=f"{first['anchor']}'s energy")
    if math.isfinite(target):
        axes.axhline(
            target,
            color="black",
            linestyle=":",
            linewidth=1.0,
            label=f"target: {first['reference']} − {first['drop_pp']:g} pp",
        )


def frontier_figure(curves: dict[str, list[dict[str, Any]]], summary: list[dict[str, Any]], title: str = ""):
    """The per-family frontier of an evaluation (one colour per policy family).

    ``curves``: family -> its results rows (``dmoe_torch.output.frontier.family_curves``);
    ``summary``: ``frontier_summary``'s rows.  Top: accuracy vs energy per image (log axis),
    every setting a marker with 95% interval bars, each family's upper envelope (what its
    iso-accuracy energy is read from) a line, the target accuracy a dotted horizontal line and
    the anchor's energy a dotted vertical one; left every family, right zoomed on the target.
    Zero-energy families (none) are dashed floors.  Bottom: the summary with its 95% paired
    bootstrap intervals: the accuracy at the anchor's energy (left) and the energy at the
    target (right, on the energy axis above; ◀: the family's cheapest setting already reaches it;
    an interval running to the edge: not reached in some resamples).
    """
    plt = pyplot()
    points = {f: [r for r in group if r["energy_uj_mean"] > 0] for f, group in curves.items()}
    points = {f: group for f, group in points.items() if group}
    floors = [r for group in curves.values() for r in group if r["energy_uj_mean"] <= 0]
    colors = policy_colors(list(curves))
    first = summary[0] if summary else {}
    target = float(first.get("target_accuracy", math.nan))
    rows = max(len(summary), 1)
    figure, panels = plt.subplots(
        2, 2, figsize=(14.0, 6.0 + 0.22 * rows), squeeze=False, gridspec_kw={"height_ratios": [4.0, 0.9 + 0.22 * rows]}
    )
    overview, detail, at_anchor, at_target = panels[0][0], panels[0][1], panels[1][0], panels[1][1]
    energies = [r["energy_uj_mean"] for group in points.values() for r in group]
    for axes in (overview, detail):
        _draw_families(axes, points, floors, colors, energies, first)
    overview.set_title("all families", fontsize=9)
    if math.isfinite(target) and energies:
        near = [r for group in points.values() for r in group if r["accuracy_mean"] >= target - 0.02]
        span = [target] + [r["accuracy_mean"] + s * _finite(r.get("accuracy_ci95")) for r in near for s in (-1, 1)]
        pad = 0.08 * (max(span) - min(span) or 0.01)
        detail.set_ylim(min(span) - pad, max(span) + pad)
    detail.set_title("near the target", fontsize=9)
    if detail.get_legend_handles_labels()[0]:
        detail.legend(fontsize=8, loc="lower right", title="family (line: upper envelope)", title_fontsize=8)
    at_target.set_xscale(detail.get_xscale())
    _forest(at_target, summary, colors, "iso_energy_uj", limits=detail.get_xlim())
    at_target.xaxis.set_major_locator(detail.xaxis.get_major_locator())
    at_target.xaxis.set_major_formatter(detail.xaxis.get_major_formatter())
    at_target.xaxis.set_minor_formatter(detail.xaxis.get_minor_formatter())
    at_target.set_xlabel("energy per image at the target accuracy (µJ), 95% paired bootstrap interval", fontsize=8)
    anchor_values = [v for row in summary for v in (row["anchor_accuracy_lo"], row["anchor_accuracy_hi"]) if math.isfinite(v)]
    if anchor_values:
        pad = 0.1 * (max(anchor_values) - min(anchor_values) or 0.01)
        at_anchor.set_xlim(100 * (min(anchor_values) - pad), 100 * (max(anchor_values) + pad))
    _forest(at_anchor, summary, colors, "anchor_accuracy", scale=100.0)
    at_anchor.set_xlabel(
        f"accuracy (%) at {first.get('anchor') or 'the anchor'}'s energy, 95% paired bootstrap interval", fontsize=8
    )
    if title:
        figure.suptitle(textwrap.fill(title, width=int(15 * figure.get_figwidth())), fontsize=9)
    figure.tight_layout()
    return figure
