"""Per-family accuracy-vs-energy frontiers: interpolation on hand-made curves, the paired
bootstrap on synthetic per-image data, and evaluate.py's frontier files on a tiny real run
merged by scripts/frontier.py."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import shutil

import numpy as np
import pytest
from support import REPO, check_ok, run_cli

from dmoe_torch.output import frontier
from dmoe_torch.output.report import read_results_csv

# --------------------------------------------------------------------------------------------
# Interpolation on hand-made curves

RISING = [(10.0, 0.80), (20.0, 0.90), (40.0, 0.95)]  # (energy µJ, accuracy), monotone
DIP = [(30.0, 0.90), (10.0, 0.80), (20.0, 0.70)]  # unsorted; (20, 0.70) is below the cheaper (10, 0.80)


@pytest.mark.parametrize(
    "target, energy",
    [
        (0.85, 15.0),  # halfway between (10, .80) and (20, .90)
        (0.925, 30.0),  # halfway between (20, .90) and (40, .95)
        (0.95, 40.0),  # exactly the dearest point
        (0.80, 10.0),  # exactly the cheapest point
        (0.70, 10.0),  # already above at the cheapest point: its energy, never extrapolated below
    ],
)
def test_iso_energy_interpolates_between_neighbours(target, energy):
    assert frontier.iso_accuracy_energy(RISING, target) == pytest.approx(energy)


def test_iso_energy_is_nan_when_never_reached():
    assert math.isnan(frontier.iso_accuracy_energy(RISING, 0.96))
    assert math.isnan(frontier.iso_accuracy_energy(RISING, math.nan))


def test_non_monotone_curve_uses_the_upper_envelope():
    # (20, .70) is dominated by (10, .80): the envelope joins (10, .80) to (30, .90), so .85 is
    # reached at 20 µJ (the raw polyline through (20, .70) would say 27.5 µJ).
    assert frontier.iso_accuracy_energy(DIP, 0.85) == pytest.approx(20.0)
    assert frontier.accuracy_at_energy(DIP, 20.0) == pytest.approx(0.85)
    # After the most accurate point the curve is flat: the cheaper setting is the better one.
    assert frontier.accuracy_at_energy([(10.0, 0.90), (20.0, 0.80)], 15.0) == pytest.approx(0.90)


@pytest.mark.parametrize("energy, accuracy", [(10.0, 0.80), (15.0, 0.85), (30.0, 0.925), (40.0, 0.95)])
def test_accuracy_at_energy_interpolates(energy, accuracy):
    assert frontier.accuracy_at_energy(RISING, energy) == pytest.approx(accuracy)


@pytest.mark.parametrize("energy", [9.99, 40.01, math.nan])
def test_accuracy_at_energy_is_nan_outside_the_curve(energy):
    assert math.isnan(frontier.accuracy_at_energy(RISING, energy))


def test_batched_curves_equal_one_by_one_and_invert_each_other():
    rng = np.random.default_rng(3)
    curves = np.stack([rng.uniform(1.0, 100.0, (50, 6)), rng.uniform(0.5, 1.0, (50, 6))], axis=-1)  # [50, 6, 2]
    targets = rng.uniform(0.5, 1.0, 50)
    batched = frontier.iso_accuracy_energy(curves, targets)
    single = [frontier.iso_accuracy_energy(curve, target) for curve, target in zip(curves, targets, strict=True)]
    np.testing.assert_array_equal(batched, single)
    # Between the cheapest point's accuracy and the best one, the two functions invert each other.
    cheapest = curves[np.arange(50), curves[..., 0].argmin(1), 1]
    inside = (targets > cheapest) & (targets <= curves[..., 1].max(1))
    assert inside.sum() > 10
    back = frontier.accuracy_at_energy(curves[inside], batched[inside])
    np.testing.assert_allclose(back, targets[inside], rtol=1e-12)


@pytest.mark.parametrize("points", [[], [1.0, 2.0], [[1.0, 2.0, 3.0]], [(1.0, math.nan)], [(math.inf, 0.5)]])
def test_bad_curve_points_fail_fast(points):
    with pytest.raises(ValueError, match="curve_points"):
        frontier.iso_accuracy_energy(points, 0.5)


def row(policy: str, gamma: str, accuracy: float, energy: float, target: str = "") -> dict:
    return {"policy": policy, "gamma": gamma, "outage_target": target, "accuracy_mean": accuracy, "energy_uj_mean": energy}


def test_family_curves_group_by_policy_name_and_outage_target():
    rows = [
        row("topk@2", "", 0.9, 20.0),
        row("jesa", "0.9", 0.9, 15.0),
        row("topk@1", "", 0.8, 10.0),
        row("jesa", "0.25", 0.85, 5.0),
        row("jesa", "0.25", 0.84, 6.0, target="0.05"),
    ]
    curves = frontier.family_curves(rows)
    assert list(curves) == ["topk", "jesa", "jesa target 5%"]
    assert [r["policy"] for r in curves["topk"]] == ["topk@1", "topk@2"]  # by energy
    assert [r["gamma"] for r in curves["jesa"]] == ["0.25", "0.9"]


# --------------------------------------------------------------------------------------------
# Paired bootstrap on synthetic per-image data

# (policy, gamma, accuracy, mean energy µJ): an image is right under every setting whose
# accuracy exceeds its difficulty u ~ U(0, 1), so better settings are right on a superset of
# images, as trained models roughly are.
SETTINGS = [
    ("topk@1", "", 0.85, 25.0),
    ("topk@2", "", 0.92, 50.0),
    ("jesa", "0.1", 0.80, 10.0),
    ("jesa", "0.25", 0.86, 20.0),
    ("jesa", "0.5", 0.90, 30.0),
    ("jesa", "0.9", 0.93, 40.0),
]


def synthetic(images: int, seed: int = 0, draws: int = 2) -> tuple[list[dict], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=(draws, images))
    accuracy = np.array([s[2] for s in SETTINGS])[:, None, None]
    energy = np.array([s[3] for s in SETTINGS])[:, None, None] * rng.gamma(4.0, 0.25, size=(1, draws, images))
    rows = [{"policy": p, "gamma": g, "outage_target": ""} for p, g, _, _ in SETTINGS]
    return rows, {"correct": difficulty[None] < accuracy, "energy_uj": energy}


def by_family(summary: list[dict]) -> dict[str, dict]:
    return {r["family"]: r for r in summary}


def test_summary_point_estimates_match_the_rows_and_intervals_contain_them():
    rows, images = synthetic(2000)
    summary = by_family(frontier.frontier_summary(rows, images, resamples=400))
    assert list(summary) == ["topk", "jesa"]
    accuracy, energy = images["correct"].mean((1, 2)), images["energy_uj"].mean((1, 2))
    jesa = summary["jesa"]
    assert jesa["target_accuracy"] == pytest.approx(accuracy[1] - 0.005)
    assert jesa["anchor_energy_uj"] == pytest.approx(energy[3])
    # At jesa 0.25's own energy its curve is at least jesa 0.25's accuracy (equal unless a cheaper point beats it).
    assert jesa["anchor_accuracy"] >= accuracy[3] - 1e-12
    curve = np.stack([energy[2:], accuracy[2:]], axis=-1)
    assert jesa["iso_energy_uj"] == pytest.approx(frontier.iso_accuracy_energy(curve, jesa["target_accuracy"]))
    assert jesa["iso_energy_vs_reference"] == pytest.approx(jesa["iso_energy_uj"] / energy[1])
    for family in summary.values():
        for name in (
            "iso_energy_uj",
            "iso_energy_vs_reference",
            "anchor_accuracy",
            "anchor_accuracy_diff",
            "target_accuracy",
            "anchor_energy_uj",
        ):
            if math.isfinite(family[name]):
                assert family[f"{name}_lo"] <= family[name] <= family[f"{name}_hi"], (family["family"], name)
    assert math.isnan(summary["topk"]["anchor_accuracy"])  # jesa 0.25's energy is below topk's cheapest


def test_interval_shrinks_with_more_images():
    def width(images: int) -> float:
        jesa = by_family(frontier.frontier_summary(*synthetic(images), resamples=400))["jesa"]
        assert jesa["iso_reached_share"] == 1.0
        return jesa["iso_energy_uj_hi"] - jesa["iso_energy_uj_lo"]

    small, large = width(400), width(6400)  # 16x the images: about a quarter of the width
    assert 0 < large < small / 2


def test_bootstrap_resamples_the_same_images_for_every_setting():
    # A copy of jesa that spends twice the energy on the same images: paired resampling makes
    # its iso energy exactly twice jesa's in every resample, so the interval too.
    rows, images = synthetic(1000)
    copy = [{**r, "policy": "double_" + r["policy"]} for r in rows[2:]]
    doubled = {
        "correct": np.concatenate([images["correct"], images["correct"][2:]]),
        "energy_uj": np.concatenate([images["energy_uj"], 2 * images["energy_uj"][2:]]),
    }
    summary = by_family(frontier.frontier_summary(rows + copy, doubled, resamples=300))
    for name in ("iso_energy_uj", "iso_energy_uj_lo", "iso_energy_uj_hi"):
        assert summary["double_jesa"][name] == pytest.approx(2 * summary["jesa"][name], rel=1e-12)
    assert summary["jesa"]["iso_energy_uj_hi"] > summary["jesa"]["iso_energy_uj_lo"]


def test_never_reached_and_missing_reference_or_anchor():
    rows, images = synthetic(500)
    images["correct"][2:] &= False  # jesa never right: never reaches the target
    jesa = by_family(frontier.frontier_summary(rows, images, resamples=200))["jesa"]
    assert math.isnan(jesa["iso_energy_uj"]) and jesa["iso_reached_share"] == 0.0
    assert math.isinf(jesa["iso_energy_uj_lo"]) and math.isinf(jesa["iso_energy_uj_hi"])
    text = frontier.frontier_csv([jesa])
    assert next(csv.DictReader(io.StringIO(text)))["iso_energy_uj_hi"] == "inf"
    absent = by_family(frontier.frontier_summary(rows, images, reference="dense", anchor=("des", 0.5), resamples=50))
    for r in absent.values():  # nothing to reach, nothing to compare at: n/a, not "never reached"
        assert all(
            math.isnan(r[name])
            for name in ("iso_energy_uj", "iso_energy_uj_hi", "iso_reached_share", "anchor_accuracy", "anchor_accuracy_hi")
        )
    assert "dense was not evaluated" in frontier.frontier_markdown(list(absent.values()))


def test_markdown_marks_a_target_reached_at_the_cheapest_setting():
    rows, images = synthetic(800)
    summary = frontier.frontier_summary(rows, images, drop_pp=20.0, resamples=100)  # target 72%: every setting reaches it
    assert all(r["iso_at_cheapest"] for r in summary)
    lines = frontier.frontier_markdown(summary).splitlines()
    for r in summary:
        line = next(line for line in lines if line.startswith(f"| {r['family']} |"))
        assert f"≤ {r['energy_min_uj']:.2f}" in line


@pytest.mark.parametrize("kwargs, match", [({"resamples": 0}, "resamples"), ({"drop_pp": -1.0}, "drop_pp")])
def test_bad_summary_arguments_fail_fast(kwargs, match):
    rows, images = synthetic(50)
    with pytest.raises(ValueError, match=match):
        frontier.frontier_summary(rows, images, **kwargs)
    with pytest.raises(ValueError, match="per_image"):
        frontier.frontier_summary(rows[:-1], images)


# --------------------------------------------------------------------------------------------
# A tiny real evaluation, and scripts/frontier.py merging two runs


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, data_root):  # noqa: F811  (fixture)
    train_dir, eval_dir = tmp_path_factory.mktemp("train"), tmp_path_factory.mktemp("eval")
    check_ok(
        run_cli(
            "train.py",
            "data.limit_train=300",
            "data.limit_test=100",
            "data.batch_size=100",
            "train.epochs=1",
            "model=tiny",
            "model.d_model=32",
            "model.num_experts=4",
            "train.warmup_steps=2",
            "device=cpu",
            "progress=false",
            f"data.root={data_root}",
            f"hydra.run.dir={train_dir}",
        )
    )
    check_ok(
        run_cli(
            "evaluate.py",
            f"ckpt={train_dir}",
            "eval.policies=[topk@1,topk@2,des,jesa]",
            "eval.gammas=[0.25,0.9]",
            "eval.channel_draws=2",
            "data.limit_test=200",
            "data.batch_size=200",
            "device=cpu",
            "progress=false",
            f"data.root={data_root}",
            f"hydra.run.dir={eval_dir}",
        )
    )
    return eval_dir


def test_evaluation_writes_one_frontier_row_per_family(evaluated):
    rows = read_results_csv(evaluated / "results.csv")
    with open(evaluated / frontier.FRONTIER_CSV, newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert [r["family"] for r in summary] == ["topk", "des", "jesa"]
    assert [int(r["settings"]) for r in summary] == [2, 2, 2]
    assert {r["anchor"] for r in summary} == {"jesa γ 0.25"} and {r["inputs"] for r in summary} == {"200"}
    with np.load(evaluated / frontier.PER_IMAGE_FILE) as data:
        assert data["correct"].shape == data["energy_uj"].shape == (6, 2, 200)
        np.testing.assert_allclose(data["correct"].mean((1, 2)), [r["accuracy_mean"] for r in rows], rtol=1e-12)
        np.testing.assert_allclose(data["energy_uj"].mean((1, 2)), [r["energy_uj_mean"] for r in rows], rtol=1e-9)
    reference = next(r for r in rows if r["policy"] == "topk@2")
    assert float(summary[0]["target_accuracy"]) == pytest.approx(reference["accuracy_mean"] - 0.005)
    markdown = (evaluated / "results.md").read_text()
    section = markdown[markdown.index("## Frontier") :]
    assert all(f"| {family} |" in section for family in ("topk", "des", "jesa"))
    assert (evaluated / frontier.FRONTIER_PNG).stat().st_size > 10_000


def frontier_script():
    spec = importlib.util.spec_from_file_location("frontier_script", REPO / "scripts" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_merges_runs_with_a_prefix(evaluated, tmp_path, capsys):
    out = tmp_path / "merged"
    assert (
        frontier_script().main(
            ["--run", str(evaluated), "--run", f"{evaluated}:learned_:jesa", "--out", str(out), "--resamples", "200"]
        )
        == 0
    )
    with open(out / frontier.FRONTIER_CSV, newline="") as handle:
        summary = {r["family"]: r for r in csv.DictReader(handle)}
    assert list(summary) == ["topk", "des", "jesa", "learned_jesa"]
    # The same images and draws, resampled together: the copy's numbers equal the original's.
    assert {k: v for k, v in summary["learned_jesa"].items() if k != "family"} == {
        k: v for k, v in summary["jesa"].items() if k != "family"
    }
    assert "| learned_jesa |" in (out / "frontier.md").read_text() and (out / frontier.FRONTIER_PNG).is_file()
    assert "| learned_jesa |" in capsys.readouterr().out


def test_merging_runs_on_other_images_fails_fast(evaluated, tmp_path):
    fewer = tmp_path / "fewer"
    shutil.copytree(evaluated, fewer, ignore=shutil.ignore_patterns("events.*", "hparams"))
    with np.load(fewer / frontier.PER_IMAGE_FILE) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["correct"], arrays["energy_uj"] = arrays["correct"][..., :150], arrays["energy_uj"][..., :150]
    np.savez_compressed(fewer / frontier.PER_IMAGE_FILE, **arrays)
    runs = [(str(evaluated), *frontier.load_run(evaluated)), (str(fewer), *frontier.load_run(fewer, "other_"))]
    with pytest.raises(ValueError, match="150 images x 2 draws"):
        frontier.merge_runs(runs)
    with pytest.raises(ValueError, match="no family foo"):
        frontier.load_run(evaluated, "x_", ["foo"])
