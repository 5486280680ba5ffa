"""Result statistics (intervals, paired tests, Pareto front), tables, the accuracy-vs-energy
plot and the TensorBoard events of an evaluation; values checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmoe_torch import stats
from dmoe_torch.config.eval import EvalPolicy
from dmoe_torch.output import report
from dmoe_torch.output.plots import accuracy_energy_figure, pareto_rows, pyplot

# --------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci95_matches_hand_computation():
    # One draw of 4 images, 3 correct: sd = 0.5, half-width = 1.96 * 0.5 / sqrt(4).
    mean, half = stats.mean_ci95([1, 1, 1, 0])
    assert mean == 0.75 and half == pytest.approx(1.959963984540054 * 0.5 / 2)
    # Two draws: per-image means [1, .5, .5, 1], sd = sqrt(4 * .25^2 / 3).
    mean, half = stats.mean_ci95([[1, 0, 1, 1], [1, 1, 0, 1]])
    assert mean == 0.75 and half == pytest.approx(1.959963984540054 * math.sqrt(0.25 / 3) / 2)
    # The interval includes the test-set sampling error: with one draw it is the binomial one.
    correct = np.r_[np.ones(9000), np.zeros(1000)]
    _, half = stats.mean_ci95(correct)
    assert half == pytest.approx(1.96 * math.sqrt(0.9 * 0.1 / 10_000), rel=1e-3)  # ~0.59 pp
    assert math.isnan(stats.mean_ci95([1])[1])


def test_sign_test_is_exact_mcnemar():
    # b = 1, c = 7 discordant pairs: p = 2 * (C(8,0) + C(8,1)) / 2^8.
    assert stats.sign_test_p(1, 7) == pytest.approx(2 * 9 / 256)
    assert stats.sign_test_p(7, 1) == pytest.approx(2 * 9 / 256)
    assert stats.sign_test_p(0, 0) == 1.0
    assert stats.sign_test_p(5, 5) == 1.0
    assert stats.sign_test_p(0, 10) == pytest.approx(2 / 1024)


def test_paired_comparison_counts_images_that_differ():
    a = [1, 1, 0, 1, 0]
    b = [0, 1, 0, 0, 1]
    c = stats.paired_comparison(a, b)
    assert c.diff == pytest.approx(0.2) and (c.wins, c.losses) == (2, 1)
    assert c.p_value == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8
    d = np.array([1, 0, 0, 1, -1], dtype=float)
    assert c.ci95 == pytest.approx(1.959963984540054 * d.std(ddof=1) / math.sqrt(5))
    with pytest.raises(ValueError):
        stats.paired_comparison([1, 0], [1, 0, 1])


def test_pareto_front():
    energy = [10.0, 5.0, 20.0, 5.0, 30.0, 0.0]
    accuracy = [0.90, 0.80, 0.95, 0.70, 0.94, 0.50]
    # (0, .5) none; (5, .8) beats (5, .7); (10, .9); (20, .95); (30, .94) is beaten by (20, .95).
    assert stats.pareto_front(energy, accuracy).tolist() == [5, 1, 0, 2]


# --------------------------------------------------------------------------------------------
# Rows and tables


def fake_results(accuracy: float, energy: float, layers: int = 2) -> dict:
    per_layer = {
        "energy_uj": energy / layers,
        "experts_per_token": 1.5,
        "outage_rate": 0.01,
        "violation_rate": 0.0,
        "drop_rate": 0.0,
        "certified_rate": 1.0,
        "utilisation": [0.5, 0.25, 0.5, 0.25],
    }
    return {
        "accuracy": accuracy,
        "energy_uj": energy,
        "energy_per_token_uj": energy / 16,
        "experts_per_token": 1.5,
        "outage_rate": 0.01,
        "violation_rate": 0.0,
        "drop_rate": 0.0,
        "certified_rate": 1.0,
        "nodes": 1.0,
        "loss": 0.5,
        "inputs": 4,
        "layers": [dict(per_layer) for _ in range(layers)],
    }


def images(correct: list[int], energy: float) -> dict:
    return {
        "correct": torch.tensor(correct, dtype=torch.bool),
        "energy_uj": torch.full((len(correct),), energy, dtype=torch.float64),
    }


def test_one_draw_prints_na_not_zero_spread():
    row = report.summarise_draws(EvalPolicy("topk", 2), [fake_results(0.75, 100.0)], [images([1, 1, 1, 0], 100.0)])
    assert math.isnan(row["accuracy_std"]) and math.isnan(row["energy_uj_std"])
    assert row["accuracy_ci95"] == pytest.approx(1.959963984540054 * 0.5 / 2)
    table = report.results_markdown([row])
    assert "| n/a |" in table and "0.00 / 0.00" not in table  # the spread over draws column
    line = report.results_csv([row]).splitlines()[1].split(",")
    header = report.results_csv([row]).splitlines()[0].split(",")
    assert line[header.index("accuracy_std")] == ""  # empty, not 0.0


def test_rows_have_per_layer_columns_and_paired_comparison():
    settings = [EvalPolicy("topk", 2), EvalPolicy("jesa", None, 0.9, 1, None)]
    per_draw = [[fake_results(0.5, 100.0)], [fake_results(0.75, 40.0)]]
    per_image = [[images([1, 0, 0, 1], 100.0)], [images([1, 1, 0, 1], 40.0)]]
    rows = [report.summarise_draws(s, r, i) for s, r, i in zip(settings, per_draw, per_image, strict=True)]
    assert report.add_comparisons(rows, per_image)
    jesa = rows[1]
    assert jesa["vs_topk2_acc_diff"] == pytest.approx(0.25)
    assert (jesa["vs_topk2_wins"], jesa["vs_topk2_losses"]) == (1, 0)
    assert jesa["vs_topk2_p_value"] == pytest.approx(1.0)
    assert (jesa["k_min"], jesa["k_max"]) == (1, "") and rows[0]["k_min"] == ""
    assert jesa["layer1_energy_uj"] == pytest.approx(20.0) and report.num_layers(jesa) == 2
    assert "reference" in report.results_markdown(rows)
    assert "| jesa | 0.9 | 20.00 / 20.00 |" in report.layers_markdown(rows)
    # Round trip through results.csv; per-expert lists (keys starting with _) stay out of it.
    text = report.results_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    assert text.splitlines()[0].startswith(",".join(report.RESULT_COLUMNS[:5]))
    assert "_utilisation" not in text


def test_no_reference_row_leaves_comparison_empty():
    rows = [report.summarise_draws(EvalPolicy("dense"), [fake_results(0.5, 1.0)], [images([1, 0], 1.0)])]
    assert not report.add_comparisons(rows, [[images([1, 0], 1.0)]])
    assert math.isnan(rows[0]["vs_topk2_acc_diff"])
    assert "| n/a |" in report.results_markdown(rows)


# --------------------------------------------------------------------------------------------
# Plot


def plot_row(policy: str, gamma: str, accuracy: float, energy: float) -> dict:
    return {
        "policy": policy,
        "gamma": gamma,
        "accuracy_mean": accuracy,
        "accuracy_ci95": 0.002,
        "energy_uj_mean": energy,
        "energy_uj_ci95": 1.0,
    }


def crowded_rows() -> list[dict]:
    """Des and jesa gammas a few µJ and 0.01 pp apart, a low channel_topk and a none floor."""
    rows = [plot_row("none", "", 0.60, 0.0), plot_row("topk@2", "", 0.9234, 495.0), plot_row("channel_topk@2", "", 0.905, 339.0)]
    for policy, base in (("des", 264.0), ("jesa", 171.0)):
        for i, gamma in enumerate((0.3, 0.5, 0.7, 0.9, 0.99)):
            rows.append(plot_row(policy, f"{gamma:g}", 0.9224 + 0.0002 * i, base * (1 + 0.02 * i)))
        rows.append(plot_row(policy, "[0.9, 0.5]", 0.9229, base * 1.05))
    return rows


def test_plot_zooms_past_outliers_labels_do_not_overlap_and_floor_is_dashed():
    figure = accuracy_energy_figure(crowded_rows(), "test", pareto=True)
    try:
        panels = figure.axes
        assert len(panels) == 2  # overview + zoom, because channel_topk and none are outliers
        zoom = panels[1]
        low, high = zoom.get_ylim()
        assert 0.905 < low < 0.9222 and high < 0.93  # the cluster fills the zoom panel
        renderer = figure.canvas.get_renderer()
        labels = [t for t in zoom.texts if t.get_text() in {"0.3", "0.5", "0.7", "0.9", "0.99", "[0.9, 0.5]"}]
        assert len(labels) >= 8  # most labels found a free spot
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b)
        frame = zoom.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)
        # The zero-energy floor is a dashed horizontal line in the overview, named in its text.
        overview = panels[0]
        floors = [line for line in overview.get_lines() if line.get_linestyle() == "--" and len(set(line.get_ydata())) == 1]
        assert floors and floors[0].get_ydata()[0] == pytest.approx(0.60)
        assert any("none" in t.get_text() and "0 µJ" in t.get_text() for t in overview.texts)
        # Per-layer gammas are markers only; scalar gammas one line.
        legend = {t.get_text() for t in zoom.get_legend().get_texts()}
        assert {"des", "des (per-layer γ)", "jesa", "jesa (per-layer γ)", "Pareto front"} <= legend
        assert zoom.get_xscale() == "log"
    finally:
        pyplot().close(figure)


def test_pareto_rows_respect_the_floor():
    rows = [plot_row("none", "", 0.6, 0.0), plot_row("a", "", 0.5, 10.0), plot_row("b", "", 0.7, 20.0)]
    assert [r["policy"] for r in pareto_rows(rows)] == ["none", "b"]  # a is worse than the floor


def test_single_panel_without_outliers():
    rows = [plot_row("jesa", f"{g:g}", 0.90 + 0.01 * i, 100.0 * (i + 1)) for i, g in enumerate((0.3, 0.5, 0.7, 0.9))]
    figure = accuracy_energy_figure(rows)
    try:
        assert len(figure.axes) == 1
    finally:
        pyplot().close(figure)


# --------------------------------------------------------------------------------------------
# TensorBoard


def test_write_results_logs_hparams_per_layer_and_utilisation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = [EvalPolicy("topk", 2), EvalPolicy("jesa", None, 0.9, 1, None)]
    per_image = [[images([1, 0, 0, 1], 100.0)], [images([1, 1, 0, 1], 40.0)]]
    rows = [
        report.summarise_draws(s, [fake_results(0.5, e)], i) for s, e, i in zip(settings, (100.0, 40.0), per_image, strict=True)
    ]
    report.add_comparisons(rows, per_image)
    for row in rows:
        row.update({"seed": 0, "channel.num_subcarriers": 16, "channel.d_max_m": 300.0})
    report.write_results(rows, tmp_path, title="t")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"seed", "channel.num_subcarriers", "layer2_energy_uj", "k_min"} <= set(header)
    assert "Per MoE layer" in (tmp_path / "results.md").read_text()
    main = EventAccumulator(str(tmp_path))
    main.Reload()
    tags = set(main.Tags()["scalars"])
    assert {"eval/accuracy/jesa/gamma=0.9", "eval/layer2/energy_uj/jesa/gamma=0.9", "eval/utilisation/layer1/topk@2"} <= tags
    assert [e.step for e in main.Scalars("eval/utilisation/layer1/topk@2")] == [0, 1, 2, 3]  # step = expert
    runs = sorted(p.name for p in (tmp_path / "hparams").iterdir())
    assert runs == ["000", "001"]
    hp = EventAccumulator(str(tmp_path / "hparams" / "001"))
    hp.Reload()
    assert hp.Scalars("eval/hparams/energy_uj")[0].value == pytest.approx(40.0)
    content = hp.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    assert b"channel.num_subcarriers" in content["_hparams_/session_start_info"]


def test_results_md_explains_the_table_once_under_it(tmp_path):
    settings = [EvalPolicy("topk", 2), EvalPolicy("jesa", None, 0.9, 1, None)]
    per_image = [[images([1, 0, 0, 1], 100.0)], [images([1, 1, 0, 1], 40.0)]]
    rows = [
        report.summarise_draws(s, [fake_results(0.5, e)], i) for s, e, i in zip(settings, (100.0, 40.0), per_image, strict=True)
    ]
    report.add_comparisons(rows, per_image)
    report.write_results(rows, tmp_path, title="t")
    text = (tmp_path / "results.md").read_text()
    legend = report.LEGEND.format(reference=report.REFERENCE_POLICY)
    assert text.count(legend) == 1
    assert text.count("half-width of the 95% interval") == 1  # no other copy, reworded or not
    last_row = text.index("| jesa | 0.9 |")
    assert last_row < text.index(legend) < text.index("## Per MoE layer")
