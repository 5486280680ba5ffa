"""The figures of ``make figures`` (:mod:`dmoe_torch.engine.sweeps`), drawn from the sweeps' results.

Each ``draw_*`` takes ``data`` (sweep name -> [(swept value, results.csv rows)]), the
checkpoint's ``facts`` (K, L, ...) and the sweeps, and returns the matplotlib figure and the
rows it plotted (written to ``<stem>.png`` and ``<stem>.csv``).  Energy is always per image, summed
over all MoE layers, unless an axis says "layer 1"; error bars are 95% intervals over the test
images and channel draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .plots import accuracy_energy_figure, pareto_rows, policy_colors, pyplot, target_text

ENERGY_LABEL = "energy per image (µJ, all MoE layers)"


@dataclass(frozen=True)
class Figure:
    name: str
    sweeps: tuple[str, ...]
    draw: Callable[..., list[dict[str, Any]]]
    requires: str = ""


def _rows(points: list[tuple[str, list[dict]]]) -> list[dict[str, Any]]:
    return [row for _, rows in points for row in rows]


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, gamma): the reference topk@2 is in several points, identically."""
    seen, unique = set(), []
    for row in rows:
        key = (row["policy"], row["gamma"], target_text(row))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _ci(row: dict[str, Any], name: str) -> float:
    value = row.get(f"{name}_ci95", math.nan)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _series_label(row: dict[str, Any]) -> str:
    return row["policy"] + (f" γ={row['gamma']}" if row["gamma"] else "")


def _plot_series(
    axes,
    rows: list[dict],
    x_key: str,
    y_key: str,
    *,
    scale: float = 1.0,
    ci: str | None = None,
    key: Callable[[dict], str] = _series_label,
    colors: dict | None = None,
) -> None:
    """One line per series ``key(row)`` of ``y_key`` against ``x_key``, with 95% bars when ``ci``."""
    colors = colors or policy_colors([r["policy"] for r in rows])
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(key(row), []).append(row)
    styles, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "v", "D")
    seen: dict[str, int] = {}
    for index, (label, group) in enumerate(series.items()):
        group = sorted(group, key=lambda r: r[x_key])
        policy = group[0]["policy"]
        # Series of one policy differ by line style, every series by marker: overlapping lines stay visible.
        style = styles[(seen.get(policy, 0) + (policy == "optimal")) % len(styles)]
        seen[policy] = seen.get(policy, 0) + 1
        axes.errorbar(
            [r[x_key] for r in group],
            [scale * r[y_key] for r in group],
            yerr=[scale * _ci(r, ci) for r in group] if ci else None,
            label=label,
            color=colors[policy],
            linestyle=style,
            marker=markers[index % len(markers)],
            markersize=5 if index else 4,
            markerfacecolor="none" if index % 2 else colors[policy],
            capsize=2,
            elinewidth=0.8,
        )


def _legend(axes, source=None) -> None:
    """The legend (of ``source``'s lines, default ``axes``') beside ``axes`` on the right,
    where it covers no line."""
    handles, labels = (source or axes).get_legend_handles_labels()
    axes.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _log_axis(axes, which: str = "y") -> None:
    """A log energy axis when the plotted values span more than a factor of 4 (else linear,
    which labels a narrow range better)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    low, high = axes.dataLim.intervaly if which == "y" else axes.dataLim.intervalx
    if not (math.isfinite(low) and math.isfinite(high) and low > 0 and high > 4 * low):
        return
    axis = axes.yaxis if which == "y" else axes.xaxis
    (axes.set_yscale if which == "y" else axes.set_xscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=30))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _subtitle(rows: list[dict]) -> str:
    images = sorted({int(r["inputs"]) for r in rows})
    draws = sorted({int(r["draws"]) for r in rows})
    return f"{'/'.join(map(str, images))} test images, {'/'.join(map(str, draws))} channel draw(s), seed {int(rows[0]['seed'])}"


# ---------------------------------------------------------------------------------------------
# 1. accuracy vs energy


def draw_accuracy_energy(data, facts, sweeps) -> tuple[Any, list[dict]]:
    rows = _unique(_rows(data["accuracy_energy"]))
    front = {id(r) for r in pareto_rows(rows)}
    title = f"Accuracy vs energy per image, every policy (Pareto front circled); {_subtitle(rows)}"
    figure = accuracy_energy_figure(rows, title, pareto=True)
    return figure, [{"pareto": id(r) in front, **r} for r in rows]


# ---------------------------------------------------------------------------------------------
# 2. energy vs subcarriers, 5. JESA certified share and gap vs N/K


def _subcarrier_axis(axes, values: list[int], K: int) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(values)
    axes.set_xticklabels([f"{n}\n({n / K:g}K)" for n in values])
    axes.minorticks_off()
    axes.set_xlabel(f"subcarriers N (K = {K} experts)")


def draw_subcarriers(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    K = facts["K"]
    main = _rows(data["subcarriers"])
    small = _rows(data["optimal"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    if main:
        _plot_series(left, main, "channel.num_subcarriers", "energy_uj_mean", ci="energy_uj")
        _subcarrier_axis(left, sorted({int(r["channel.num_subcarriers"]) for r in main}), K)
        left.set_title(f"topk@2, des, jesa\n{_subtitle(main)}", fontsize=9)
    if small:
        _plot_series(right, small, "channel.num_subcarriers", "energy_uj_mean", ci="energy_uj")
        _subcarrier_axis(right, sorted({int(r["channel.num_subcarriers"]) for r in small}), K)
        right.set_title(f"jesa vs the MILP optimum on the same inputs\n{_subtitle(small)}", fontsize=9)
    for axes in (left, right):
        _log_axis(axes)
        axes.set_ylabel(ENERGY_LABEL)
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:
            _legend(axes)
    figure.suptitle("Energy per image vs number of subcarriers N", fontsize=10)
    figure.tight_layout()
    return figure, [{"sweep": "subcarriers", **r} for r in main] + [{"sweep": "optimal", **r} for r in small]


def _gaps(small: list[dict]) -> list[dict]:
    """Per (N, gamma): jesa's energy above optimal's on the same inputs, in %: all layers, and
    MoE layer 1 alone (whose inputs are identical for both; later layers see different tokens)."""
    by_key = {(int(r["channel.num_subcarriers"]), r["gamma"], r["policy"]): r for r in small}
    gaps = []
    for (n, gamma, policy), jesa in sorted(by_key.items()):
        optimal = by_key.get((n, gamma, "optimal"))
        if policy != "jesa" or optimal is None:
            continue
        gaps.append(
            {
                "num_subcarriers": n,
                "gamma": gamma,
                "gap_pct": 100 * (jesa["energy_uj_mean"] / optimal["energy_uj_mean"] - 1),
                "gap_layer1_pct": 100 * (jesa["layer1_energy_uj"] / optimal["layer1_energy_uj"] - 1),
                "jesa_certified_rate": jesa["certified_rate"],
                "inputs": jesa["inputs"],
            }
        )
    return gaps


def draw_jesa_gap(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    K = facts["K"]
    main = [r for r in _rows(data["subcarriers"]) if r["policy"] == "jesa"]
    gaps = _gaps(_rows(data["optimal"]))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    for r in main:
        r["n_over_k"] = r["channel.num_subcarriers"] / K
    if main:
        _plot_series(left, main, "n_over_k", "certified_rate", scale=100.0)
        left.set_title(f"share of JESA selections proven optimal\n{_subtitle(main)}", fontsize=9)
    left.set_ylabel("certified (% of tokens and MoE layers)")
    for gamma in sorted({g["gamma"] for g in gaps}):
        points = [g for g in gaps if g["gamma"] == gamma]
        x = [g["num_subcarriers"] / K for g in points]
        right.plot(x, [g["gap_pct"] for g in points], marker="o", label=f"γ={gamma}, all MoE layers")
        right.plot(x, [g["gap_layer1_pct"] for g in points], marker="s", linestyle="--", label=f"γ={gamma}, MoE layer 1")
    if gaps:
        right.set_title(f"JESA energy above the MILP optimum\n{gaps[0]['inputs']} test images", fontsize=9)
    right.set_ylabel("gap to optimum (% of the optimal energy)")
    right.axhline(0.0, color="0.5", linewidth=0.8)
    ratios = sorted({r["n_over_k"] for r in main} | {g["num_subcarriers"] / K for g in gaps})
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ratios, [f"{v:g}" for v in ratios])
        axes.minorticks_off()
        axes.set_xlabel("subcarriers per expert N/K")
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:
            _legend(axes)
    figure.suptitle("JESA: certified share and measured gap to the MILP optimum vs N/K", fontsize=10)
    figure.tight_layout()
    return figure, [{"quantity": "certified", **r} for r in main] + [{"quantity": "gap", **g} for g in gaps]


# ---------------------------------------------------------------------------------------------
# 3. gamma


def draw_gamma(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    rows = _unique(_rows(data["accuracy_energy"]))
    curve = [
        dict(r, gamma_value=float(r["gamma"]))
        for r in rows
        if r["policy"] in ("des", "jesa") and r["gamma"] and not r["gamma"].startswith("[")
    ]
    reference = next((r for r in rows if r["policy"] == "topk@2"), None)
    figure, axes = plt.subplots(2, 2, figsize=(12.0, 8.6))
    (acc, energy), (heat_acc, heat_energy) = axes
    colors = policy_colors([r["policy"] for r in rows])
    for panel, name, scale in ((acc, "accuracy", 100.0), (energy, "energy_uj", 1.0)):
        _plot_series(panel, curve, "gamma_value", f"{name}_mean", scale=scale, ci=name, key=lambda r: r["policy"], colors=colors)
        if reference is not None:
            value, half = scale * reference[f"{name}_mean"], scale * _ci(reference, name)
            panel.axhline(value, color=colors["topk@2"], linestyle="--", linewidth=1.0, label="topk@2 (95% band)")
            panel.axhspan(value - half, value + half, color=colors["topk@2"], alpha=0.12, linewidth=0)
        panel.set_xlabel("importance factor γ (every MoE layer)")
        panel.grid(True, which="both", alpha=0.3)
        if panel.lines:
            _legend(panel)
    acc.set_ylabel("test accuracy (%)")
    energy.set_ylabel(ENERGY_LABEL)
    _log_axis(energy)
    acc.set_title(f"accuracy vs γ\n{_subtitle(rows)}" if rows else "accuracy vs γ", fontsize=9)
    energy.set_title("energy vs γ", fontsize=9)
    cells = _layer_cells(data["layer_gammas"], sweeps["layer_gammas"], facts["L"]) if data["layer_gammas"] else []
    gammas = sorted({c["gamma_layer"] for c in cells})
    for panel, name, scale, fmt, unit in (
        (heat_acc, "accuracy_mean", 100.0, ".1f", "test accuracy (%)"),
        (heat_energy, "energy_uj_mean", 1.0, ".0f", ENERGY_LABEL),
    ):
        if not cells:
            panel.axis("off")
            continue
        grid = np.full((facts["L"], len(gammas)), np.nan)
        for c in cells:
            grid[c["layer"] - 1, gammas.index(c["gamma_layer"])] = scale * c[name]
        image = panel.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                bright = image.norm(value) > 0.6
                panel.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8, color="black" if bright else "white")
        panel.set_xticks(range(len(gammas)), [f"{g:g}" for g in gammas])
        panel.set_yticks(range(facts["L"]), [f"MoE layer {i + 1}" for i in range(facts["L"])])
        base = cells[0]["base"] if cells else math.nan
        panel.set_xlabel(f"γ of that layer (the other layers at γ={base:g})" if math.isfinite(base) else "γ of the layer")
        figure.colorbar(image, ax=panel, label=unit)
    policy = cells[0]["policy"] if cells else ""
    heat_acc.set_title(f"{policy}: accuracy when one layer lowers γ (which layer tolerates it)", fontsize=9)
    heat_energy.set_title(f"{policy}: energy when one layer lowers γ", fontsize=9)
    figure.suptitle("Energy and accuracy vs the importance factor γ", fontsize=10)
    figure.tight_layout()
    return figure, [{"panel": "gamma", **r} for r in curve] + [{"panel": "per-layer gamma", **c} for c in cells]


def _layer_cells(points, sweep, num_layers: int) -> list[dict]:
    """Heat-map cells: the row of the per-layer gamma list in which layer l (1-based) takes
    gamma_layer and the others the base value."""
    cells = []
    for value, rows in points:
        layer = sweep.values.index(value)
        vectors = json.loads(value)
        base = vectors[0][(layer + 1) % num_layers] if num_layers > 1 else math.nan  # the other layers' gamma
        for row in rows:
            gamma = json.loads(row["gamma"]) if row["gamma"].startswith("[") else [float(row["gamma"])] * num_layers
            cells.append({"layer": layer + 1, "gamma_layer": float(gamma[layer]), "base": float(base), **row})
    return cells


# ---------------------------------------------------------------------------------------------
# 4. cell radius


def edge_snr_db(row: dict[str, Any]) -> float:
    """Mean SNR (dB) of a device at the cell edge d_max, from the row's channel.* columns."""
    from dataclasses import fields as dc_fields

    from ..channel import ChannelConfig, path_loss_db

    names = {f.name for f in dc_fields(ChannelConfig)}
    cfg = ChannelConfig(**{k[8:]: row[k] for k in row if k.startswith("channel.") and k[8:] in names})
    power = min(cfg.ap_power_w, cfg.device_power_w)
    return float(10 * math.log10(power / cfg.noise_power_w) - path_loss_db(cfg.d_max_m))


def draw_cell(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    rows = [dict(r, edge_snr_db=edge_snr_db(r)) for r in _rows(data["cell"])]
    figure, panels = plt.subplots(1, 3, figsize=(15.0, 4.8))
    specs = (
        (panels[0], "energy_uj_mean", 1.0, "energy_uj", ENERGY_LABEL),
        (panels[1], "outage_rate", 100.0, None, "realised outage (% of selected links)"),
        (panels[2], "accuracy_mean", 100.0, "accuracy", "test accuracy (%)"),
    )
    radii = sorted({r["channel.d_max_m"] for r in rows})
    snr = {r["channel.d_max_m"]: r["edge_snr_db"] for r in rows}
    for axes, y, scale, ci, label in specs:
        _plot_series(axes, rows, "channel.d_max_m", y, scale=scale, ci=ci)
        axes.set_ylabel(label)
        axes.set_xlabel("cell radius d_max (m)")
        axes.grid(True, which="both", alpha=0.3)
        top = axes.secondary_xaxis("top")
        top.set_xticks(radii, [f"{snr[d]:.0f}" for d in radii])
        top.set_xlabel("mean SNR at the cell edge (dB)", fontsize=8)
        top.tick_params(labelsize=8)
    _log_axis(panels[0])
    _legend(panels[-1], panels[0])
    figure.suptitle(f"Energy, outage and accuracy vs cell radius ({_subtitle(rows)})" if rows else "", fontsize=10)
    figure.tight_layout()
    return figure, rows


# ---------------------------------------------------------------------------------------------
# 6. CSI error


def _target_label(row: dict[str, Any]) -> str:
    if row["policy"] not in ("des", "jesa", "optimal"):
        return _series_label(row)
    target = target_text(row)
    return f"{_series_label(row)} " + (f"robust, {target}" if target else "naive")


def draw_csi(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    rows = _rows(data["csi"])
    figure, panels = plt.subplots(1, 3, figsize=(15.0, 4.8))
    for axes, y, scale, ci, label in (
        (panels[0], "outage_rate", 100.0, None, "realised outage (% of selected links)"),
        (panels[1], "energy_uj_mean", 1.0, "energy_uj", ENERGY_LABEL),
        (panels[2], "accuracy_mean", 100.0, "accuracy", "test accuracy (%)"),
    ):
        _plot_series(axes, rows, "channel.csi_error_std", y, scale=scale, ci=ci, key=_target_label)
        axes.set_xlabel("CSI error ε (std of the estimate's error)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    targets = sorted(
        {r["outage_target"] for r in rows if isinstance(r.get("outage_target"), float) and math.isfinite(r["outage_target"])}
    )
    for target in targets:
        panels[0].axhline(100 * target, color="0.4", linestyle=":", linewidth=1.0, label=f"target {100 * target:g}%")
    _legend(panels[-1], panels[0])
    figure.suptitle(
        f"Imperfect CSI: realised outage and energy, naive vs robust planning ({_subtitle(rows)})" if rows else "", fontsize=10
    )
    figure.tight_layout()
    return figure, rows


# ---------------------------------------------------------------------------------------------
# 7. delay spread (TR 38.901 TDL, correlated subcarriers)


def _jesa_savings(rows: list[dict]) -> list[dict]:
    """Per (spacing, delay spread, gamma): jesa's energy below des's on the same inputs, in %."""
    by_key = {(r["channel.subcarrier_bandwidth_hz"], r["channel.delay_spread_s"], r["gamma"], r["policy"]): r for r in rows}
    savings = []
    for (spacing, spread, gamma, policy), jesa in sorted(by_key.items()):
        des = by_key.get((spacing, spread, gamma, "des"))
        if policy == "jesa" and des is not None and des["energy_uj_mean"] > 0:
            savings.append(
                {
                    "spacing_hz": spacing,
                    "delay_spread_s": spread,
                    "gamma": gamma,
                    "saving_pct": 100 * (1 - jesa["energy_uj_mean"] / des["energy_uj_mean"]),
                }
            )
    return savings


def draw_delay_spread(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    figure, panels = plt.subplots(1, 3, figsize=(15.5, 4.8))
    every = []
    for axes, name in zip(panels[:2], ("delay_spread_wide", "delay_spread_narrow"), strict=True):
        rows = [dict(r, delay_spread_ns=1e9 * r["channel.delay_spread_s"]) for r in _rows(data[name])]
        every += [{"sweep": name, **r} for r in rows]
        if not rows:
            continue
        _plot_series(axes, rows, "delay_spread_ns", "energy_uj_mean", ci="energy_uj")
        axes.set_xscale("log")
        _log_axis(axes)
        spacing = rows[0]["channel.subcarrier_bandwidth_hz"]
        axes.set_title(
            f"Δf = {spacing / 1e3:g} kHz, T_max = {1e3 * rows[0]['channel.latency_budget_s']:.3g} ms, "
            f"TDL-{rows[0]['channel.tdl_profile']}\n{_subtitle(rows)}",
            fontsize=9,
        )
        axes.set_xlabel("RMS delay spread (ns): flat → frequency-selective")
        axes.set_ylabel(ENERGY_LABEL)
        axes.grid(True, which="both", alpha=0.3)
        _legend(axes)
    savings = _jesa_savings([r for r in every])
    for spacing in sorted({s["spacing_hz"] for s in savings}, reverse=True):
        for gamma in sorted({s["gamma"] for s in savings if s["spacing_hz"] == spacing}):
            points = [s for s in savings if s["spacing_hz"] == spacing and s["gamma"] == gamma]
            panels[2].plot(
                [1e9 * p["delay_spread_s"] for p in points],
                [p["saving_pct"] for p in points],
                marker="o",
                label=f"Δf = {spacing / 1e3:g} kHz, γ={gamma}",
            )
    panels[2].set_xscale("log")
    panels[2].set_xlabel("RMS delay spread (ns)")
    panels[2].set_ylabel("JESA's energy saving over DES (%)")
    panels[2].grid(True, which="both", alpha=0.3)
    if panels[2].lines:
        panels[2].legend(fontsize=8)
    figure.suptitle("Energy per image vs delay spread (TR 38.901 TDL, channel.model=tdl)", fontsize=10)
    figure.tight_layout()
    return figure, every


# ---------------------------------------------------------------------------------------------
# 8. latency budget under image frames (channel.frame=image; token frames as the reference)


def _frame_rows(data) -> list[dict]:
    """The rows of both frame sweeps, each with ``frame`` (image | token), ``latency_budget_ms``
    (the swept T_max, ms) and ``frame_overrun_rate`` (nan in results that predate it)."""
    rows = []
    for frame in ("image", "token"):
        for value, points in data.get(f"frame_latency_{frame}", []):
            for r in points:
                rows.append({"frame": frame, "latency_budget_ms": 1e3 * float(value), **r})
                rows[-1].setdefault("frame_overrun_rate", math.nan)
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _frame_series(axes, rows: list[dict], y_key: str, *, scale: float, ci: str | None, colors: dict) -> None:
    """One line per (policy, γ, frame) of ``y_key`` against T_max: colour by policy, marker by
    (policy, γ), solid with filled markers for image frames, dashed and hollow for token frames."""
    names = list(dict.fromkeys(_series_label(r) for r in rows))
    markers = ("o", "s", "^", "v", "D", "P", "X")
    for name in names:
        for frame in ("image", "token"):
            group = sorted(
                (r for r in rows if _series_label(r) == name and r["frame"] == frame), key=lambda r: r["latency_budget_ms"]
            )
            if not group:
                continue
            color = colors[group[0]["policy"]]
            axes.errorbar(
                [r["latency_budget_ms"] for r in group],
                [scale * r[y_key] for r in group],
                yerr=[scale * _ci(r, ci) for r in group] if ci else None,
                label=f"{name}, {frame} frames",
                color=color,
                linestyle="-" if frame == "image" else "--",
                marker=markers[names.index(name) % len(markers)],
                markersize=5,
                markerfacecolor=color if frame == "image" else "none",
                capsize=2,
                elinewidth=0.8,
            )


def draw_frame_latency(data, facts, sweeps) -> tuple[Any, list[dict]]:
    plt = pyplot()
    rows = _frame_rows(data)
    figure, axes = plt.subplots(2, 2, figsize=(13.0, 8.6))
    (energy, acc), (violation, overrun) = axes
    colors = policy_colors([r["policy"] for r in rows])
    specs = (
        (energy, rows, "energy_uj_mean", 1.0, "energy_uj", ENERGY_LABEL, "energy per image"),
        (acc, rows, "accuracy_mean", 100.0, "accuracy", "test accuracy (%)", "accuracy"),
        (
            violation,
            rows,
            "violation_rate",
            100.0,
            None,
            "violations (% of tokens and MoE layers)",
            "tokens missing γ / k_min or dropped (image frames: past the capacity)",
        ),
        (
            overrun,
            [r for r in rows if _finite(r["frame_overrun_rate"])],
            "frame_overrun_rate",
            100.0,
            None,
            "frame overruns (% of frames and MoE layers)",
            "frames where a device's hop exceeds T_max (topk@2 ignores the capacity)",
        ),
    )
    budgets = sorted({r["latency_budget_ms"] for r in rows})
    for panel, points, y, scale, ci, ylabel, title in specs:
        if points:
            _frame_series(panel, points, y, scale=scale, ci=ci, colors=colors)
        elif rows:
            panel.text(
                0.5,
                0.5,
                f"no {y} in these results\n(evaluated before it existed)",
                ha="center",
                va="center",
                transform=panel.transAxes,
                fontsize=9,
            )
        if _finite(facts.get("latency_s")):
            panel.axvline(1e3 * facts["latency_s"], color="0.5", linestyle=":", linewidth=1.0, label="checkpoint's T_max")
        if budgets:
            panel.set_xscale("log", base=2)
            panel.set_xticks(budgets, [f"{b:g}" for b in budgets])
            panel.minorticks_off()
        panel.set_xlabel("latency budget T_max per hop (ms)")
        panel.set_ylabel(ylabel)
        panel.set_title(title, fontsize=9)
        panel.grid(True, which="both", alpha=0.3)
    _log_axis(energy)
    if energy.lines:
        _legend(acc, energy)
    figure.suptitle(
        "Energy and accuracy vs the latency budget T_max: image frames (solid; link capacity "
        "⌊T_max·rate/S⌋ tokens) vs token frames (dashed)" + (f"\n{_subtitle(rows)}" if rows else ""),
        fontsize=10,
    )
    figure.tight_layout()
    return figure, rows


FIGURES: dict[int, Figure] = {
    1: Figure("accuracy_energy", ("accuracy_energy",), draw_accuracy_energy),
    2: Figure("subcarriers", ("subcarriers", "optimal"), draw_subcarriers),
    3: Figure("gamma", ("accuracy_energy", "layer_gammas"), draw_gamma),
    4: Figure("cell_radius", ("cell",), draw_cell),
    5: Figure("jesa_gap", ("subcarriers", "optimal"), draw_jesa_gap),
    6: Figure(
        "csi_error",
        ("csi",),
        draw_csi,
        requires="needs channel.csi_error_std and eval.outage_targets, which this version does not have yet",
    ),
    7: Figure("delay_spread", ("delay_spread_wide", "delay_spread_narrow"), draw_delay_spread),
    8: Figure(
        "frame_latency",
        ("frame_latency_image", "frame_latency_token"),
        draw_frame_latency,
        requires="needs channel.frame (token | image), which this version does not have yet",
    ),
}
