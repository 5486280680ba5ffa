"""The experiment suite of ``make figures``: evaluation sweeps of one checkpoint, and the figures.

Each sweep is a Hydra multirun of evaluate.py over one key (``channel.num_subcarriers``,
``channel.d_max_m``, ``eval.policies``, ...), the other keys fixed; its settings come from
``conf/figures/default.yaml`` (or ``quick.yaml``).  Every point is an ordinary evaluate.py run
with its own directory::

    OUT/sweeps/<mode>-<checkpoint sha256[:12]>/<sweep>/<key>=<value>/results.csv (.md, .png, events)
    OUT/fig<i>_<name>.png and .csv          one figure and the rows it plots

A point counts as computed when its directory holds results.csv and Hydra's record of its
overrides (``.hydra/overrides.yaml``) equals the point's overrides (``ckpt`` aside: the
checkpoint is identified by its sha256 in the folder name), so an interrupted or partly failed
run computes only the missing points when rerun; a new checkpoint or other settings (other
overrides) never reuse old points.  A failing point is
reported in one line naming it; the others are computed and plotted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import EVAL_KEYS, ConfigError, validate_model
from ..utils import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf" / "figures"
DEFAULT_CKPT = "outputs/default/checkpoint.pt"
DEFAULT_OUT = "outputs/figures"
DOCS_DPI = 64  # the README's copies: about 100 kB each


def hydra_value(value: Any) -> str:
    """A Python value as Hydra override text: None -> null, [0.5, [0.9, 0.3]] -> [0.5,[0.9,0.3]]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str) and not all(c.isalnum() or c in "_-./@" for c in value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"  # e.g. a path with spaces
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Sweep:
    """One multirun: ``key`` takes each of ``values`` (override text); ``fixed`` overrides the rest."""

    name: str
    key: str
    values: tuple[str, ...]
    fixed: tuple[str, ...]

    def overrides(self, value: str) -> list[str]:
        return [*self.fixed, f"{self.key}={value}"]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``{key: value}`` of Hydra override strings (``++key`` and ``key`` alike), without
    Hydra's own (``hydra.*``, ``hydra/launcher=...``), which a job's record does not list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed if not o.key_or_group.startswith(("hydra.", "hydra/"))}


def find_points(sweep: Sweep, root: Path) -> dict[str, Path]:
    """The computed points of ``sweep`` under ``root``: value -> directory holding results.csv."""

    def key(overrides: list[str]) -> dict[str, Any]:
        parsed = parse_overrides(overrides)
        parsed.pop("ckpt", None)  # the same file (sha256 in the folder name) wherever it lies
        return parsed

    wanted = {value: key(sweep.overrides(value)) for value in sweep.values}
    found: dict[str, Path] = {}
    for record in sorted((root / sweep.name).glob("*/.hydra/overrides.yaml")):
        point = record.parent.parent
        if not (point / "results.csv").is_file():
            continue
        recorded = key(list(OmegaConf.load(record)))
        for value, overrides in wanted.items():
            if recorded == overrides:
                found[value] = point
    return found


# ---------------------------------------------------------------------------------------------
# Sweep definitions


def checkpoint_facts(ckpt: str) -> dict[str, Any]:
    """The checkpoint's sha256 prefix, number of experts K and MoE layers L (ConfigError naming
    CKPT when the file is missing or not a checkpoint)."""
    from .checkpoint import checkpoint_file, load_checkpoint

    path = checkpoint_file(ckpt, key="CKPT")
    payload = load_checkpoint(path, key="CKPT")
    config = OmegaConf.create(payload["config"])
    try:
        shape = validate_model(config)
    except ConfigError as exc:
        raise ConfigError(f"CKPT={str(path)!r}: the checkpoint's config is invalid ({exc})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return {
        "path": path,
        "sha": digest,
        "K": shape.num_experts,
        "L": shape.num_moe_layers,
        "T": shape.tokens_per_input,  # routed inputs per image
        "d_min_m": float(config.channel.d_min_m),
        "bandwidth_hz": float(config.channel.subcarrier_bandwidth_hz),
        "latency_s": float(config.channel.latency_budget_s),
    }


def csi_supported() -> bool:
    """Figure 6 needs channel.csi_error_std and eval.outage_targets."""
    from ..channel import ChannelConfig

    return "csi_error_std" in {f.name for f in fields(ChannelConfig)} and "outage_targets" in EVAL_KEYS


def frames_supported() -> bool:
    """Figure 8 needs channel.frame (token | image)."""
    from ..channel import ChannelConfig

    return "frame" in {f.name for f in fields(ChannelConfig)}


# Figures that need a feature this version may not have: number -> its check.
SUPPORTED: dict[int, Callable[[], bool]] = {6: csi_supported, 8: frames_supported}


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@dataclass(frozen=True)
class _SweepMaker:
    """Turns each section of a figures settings file (conf/figures/*.yaml) into (the swept key,
    its values, the fixed overrides) for a checkpoint with ``facts``; one method per sweep."""

    spec: DictConfig
    facts: dict[str, Any]
    extra: tuple[str, ...]

    def fixed(self, section: DictConfig, **keys: Any) -> tuple[str, ...]:
        """The overrides every point of a sweep shares: the checkpoint, the section's (or the
        file's) image count and draws, ``keys``, then the caller's extra overrides."""
        spec = self.spec
        base = {
            "ckpt": str(self.facts["path"]),
            "progress": False,
            "data.batch_size": spec.batch_size,
            "data.limit_test": section.limit_test if "limit_test" in section else spec.limit_test,
            "eval.channel_draws": section.draws if "draws" in section else spec.draws,
            **keys,
        }
        return tuple(f"{k}={hydra_value(v)}" for k, v in base.items()) + self.extra

    def accuracy_energy(self, s):
        return "eval.policies", [_plain(g) for g in s.policy_groups], self.fixed(s, **{"eval.gammas": _plain(s.gammas)})

    def subcarriers(self, s, policies=None):
        return (
            "++channel.num_subcarriers",
            [int(m * self.facts["K"]) for m in s.multiples],
            self.fixed(s, **{"eval.policies": policies or _plain(s.policies), "eval.gammas": _plain(s.gammas)}),
        )

    def optimal(self, s):
        # One MILP per routed token: the image count follows from a token budget.
        s = OmegaConf.merge(s, {"limit_test": max(1, int(s.tokens) // self.facts["T"])})
        return self.subcarriers(s, ["jesa", "optimal"])

    def layer_gammas(self, s):
        L = self.facts["L"]
        lists = [[[float(g) if i == layer else float(s.base) for i in range(L)] for g in s.gammas] for layer in range(L)]
        return "eval.gammas", lists, self.fixed(s, **{"eval.policies": [s.policy]})

    def cell(self, s):
        radii = [float(d) for d in s.d_max_m if float(d) > self.facts["d_min_m"]]  # d_max must exceed the checkpoint's d_min
        return "++channel.d_max_m", radii, self.fixed(s, **{"eval.policies": _plain(s.policies), "eval.gammas": _plain(s.gammas)})

    def csi(self, s):
        keys = {
            "eval.policies": _plain(s.policies),
            "eval.gammas": _plain(s.gammas),
            "eval.outage_targets": _plain(s.outage_targets),
        }
        return "++channel.csi_error_std", [float(v) for v in s.csi_error_std], self.fixed(s, **keys)

    def delay_spread(self, s, spacing_hz: float):
        # TDL at one subcarrier spacing; T_max scales with 1 / spacing so that a hop needs the
        # checkpoint's spectral efficiency.  optimal is a MILP per token: a token budget again.
        s = OmegaConf.merge(s, {"limit_test": max(1, int(s.tokens) // self.facts["T"])})
        tdl = {
            "++channel.model": "tdl",
            "++channel.tdl_profile": str(s.tdl_profile),
            "++channel.subcarrier_bandwidth_hz": float(spacing_hz),
            "++channel.latency_budget_s": self.facts["latency_s"] * self.facts["bandwidth_hz"] / float(spacing_hz),
        }
        keys = {"eval.policies": _plain(s.policies), "eval.gammas": _plain(s.gammas), **tdl}
        return "++channel.delay_spread_s", [float(v) for v in s.delay_spread_s], self.fixed(s, **keys)

    def delay_spread_wide(self, s):
        return self.delay_spread(s, s.wide_spacing_hz)

    def delay_spread_narrow(self, s):
        return self.delay_spread(s, s.narrow_spacing_hz)

    def frame_latency(self, s, frame: str):
        # T_max under image frames (an image's tokens share one frame per MoE layer: link capacity
        # floor(T_max * rate / S) tokens) or token frames (the reference); topk_capacity and
        # jesa_tokenwise exist only for image frames.
        from ..selection.policies import policy_names

        policies = [p for p in _plain(s.policies) if frame == "image" or str(p).split("@")[0] in policy_names("token")]
        keys = {"eval.policies": policies, "eval.gammas": _plain(s.gammas), "++channel.frame": frame}
        return "++channel.latency_budget_s", [float(v) for v in s.latency_budget_s], self.fixed(s, **keys)

    def frame_latency_image(self, s):
        return self.frame_latency(s, "image")

    def frame_latency_token(self, s):
        return self.frame_latency(s, "token")


# The sweeps in the order they run; a name ending in _wide/_narrow/_image/_token is one of the
# two sweeps of its section.
SWEEP_NAMES = (
    "accuracy_energy",
    "subcarriers",
    "optimal",
    "layer_gammas",
    "cell",
    "csi",
    "delay_spread_wide",
    "delay_spread_narrow",
    "frame_latency_image",
    "frame_latency_token",
)


def build_sweeps(spec: DictConfig, facts: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Sweep]:
    """The sweeps of ``spec`` (conf/figures/*.yaml) for a checkpoint with ``facts``; a section
    the file does not have gives no sweep (its figures are skipped with a note), and so does
    one this machine cannot run (imperfect CSI, image frames)."""
    maker = _SweepMaker(spec, facts, tuple(extra))
    supported = {"csi": csi_supported, "frame_latency_image": frames_supported, "frame_latency_token": frames_supported}
    sweeps: dict[str, Sweep] = {}
    for name in SWEEP_NAMES:
        two = name.startswith(("delay_spread_", "frame_latency_"))
        section = name.rsplit("_", 1)[0] if two else name  # two sweeps of one section
        if section not in spec or (name in supported and not supported[name]()):
            continue
        try:
            key, values, overrides = getattr(maker, name)(spec[section])
        except Exception as exc:  # a missing or mistyped key of the settings file
            raise ConfigError(f"{name}: {str(exc).splitlines()[0]} (settings file)") from None
        sweeps[name] = Sweep(name, key, tuple(hydra_value(v) for v in values), overrides)
    return sweeps


# ---------------------------------------------------------------------------------------------
# Running the sweeps


def _error_line(text: str) -> str:
    """The one-line ``Error: ...`` evaluate.py printed, else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.removeprefix("Error:").strip() for line in lines if line.startswith("Error:")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:500]


def launch(sweep: Sweep, values: list[str], root: Path, *, jobs: int, log: Path, echo: Callable[[str], None]) -> tuple[int, str]:
    """Run evaluate.py -m over ``values`` of ``sweep``; returns (exit status, its error line)."""
    excluded = ",".join(o.split("=", 1)[0].lstrip("+") for o in sweep.fixed)
    command = [
        sys.executable,
        str(REPO / "evaluate.py"),
        "-m",
        *sweep.fixed,
        f"{sweep.key}={','.join(values)}",
        f"hydra.sweep.dir={hydra_value(str(root / sweep.name))}",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{excluded}]",
    ]
    if jobs > 1:
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if jobs > 1:  # parallel points: one compute thread each, unless the caller chose otherwise
        env.setdefault("OMP_NUM_THREADS", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    output = io.StringIO()
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            handle.write(line)
            output.write(line)
            if "[HYDRA]" in line and "\t#" in line:  # "#3 : key=value ..." as Hydra launches a point
                echo(
                    f"  point {line.split(chr(9) + '#', 1)[1].split(':', 1)[0].strip()}: "
                    + next((o.lstrip("+") for o in line.split() if o.lstrip("+").startswith(sweep.key.lstrip("+") + "=")), "")
                )
        status = process.wait()
    return status, _error_line(output.getvalue()) if status else ""


def run_sweep(sweep: Sweep, root: Path, *, jobs: int, echo: Callable[[str], None]) -> list[str]:
    """Compute the missing points of ``sweep``; returns one error line per failed point."""
    missing = [v for v in sweep.values if v not in find_points(sweep, root)]
    echo(
        f"sweep {sweep.name}: {len(sweep.values)} points over {sweep.key.lstrip('+')}, "
        f"{len(missing)} to compute" + ("" if missing else " (all computed before)")
    )
    if not missing:
        return []
    start = time.perf_counter()
    log = root / sweep.name / "sweep.log"
    status, error = launch(sweep, missing, root, jobs=jobs, log=log, echo=echo)
    errors = []
    if status:
        # A multirun stops at its first failing point: run the rest one by one to name each failure.
        for value in [v for v in sweep.values if v not in find_points(sweep, root)]:
            status, error = launch(sweep, [value], root, jobs=1, log=log, echo=echo)
            if status:
                errors.append(f"sweep {sweep.name}: point {sweep.key.lstrip('+')}={value} failed: {error} (log: {log})")
    echo(f"sweep {sweep.name}: {time.perf_counter() - start:.0f} s")
    return errors


def load_points(sweep: Sweep, root: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(value, result rows) of every computed point, in the sweep's order."""
    from ..output.report import read_results_csv

    found = find_points(sweep, root)
    return [(value, read_results_csv(found[value] / "results.csv")) for value in sweep.values if value in found]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts, the union of their keys in first-seen order as columns), atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Command line


def check_out_dir(out: Path, key: str = "OUT") -> None:
    """``out`` must be a directory we can write (ConfigError naming ``key`` otherwise)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={str(out)!r}: not a writable directory ({exc.strerror or exc})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/figures.py",
        description="Evaluation sweeps of a trained checkpoint and the figures of docs/figures (see conf/figures/).",
    )
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint.pt or run directory (default {DEFAULT_CKPT})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="conf/figures/quick.yaml: few images and points (minutes)")
    parser.add_argument("--config", default=None, help="a sweep settings file instead of conf/figures/{default,quick}.yaml")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="sweep points run in parallel (>1: Hydra's joblib launcher, one thread per point "
        "unless OMP_NUM_THREADS is set; default 1)",
    )
    parser.add_argument("--docs", default=None, help="also write small copies of the PNGs to this folder (docs/figures)")
    parser.add_argument("--only", default="", help="comma-separated figure numbers, e.g. 1,3 (default: all)")
    parser.add_argument("overrides", nargs="*", help="extra evaluate.py overrides for every point, e.g. device=cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps and draw the figures; 0 when everything was drawn, 1 when a point failed,
    2 for a bad CKPT / OUT / setting (one ``Error:`` line each)."""
    from ..output.figures import FIGURES

    args = parse_args(argv)
    echo = lambda text: print(text, flush=True)  # noqa: E731
    try:
        if args.jobs < 1:
            raise ConfigError(f"JOBS={args.jobs}: must be an integer >= 1")
        try:
            only = {int(x) for x in args.only.split(",") if x.strip()} if args.only else set(FIGURES)
        except ValueError:
            only = {0}
        if only - set(FIGURES):
            raise ConfigError(f"--only={args.only}: must be figure numbers among {', '.join(map(str, FIGURES))}, e.g. 1,3")
        facts = checkpoint_facts(args.ckpt)
        out = Path(args.out)
        check_out_dir(out)
        docs = None if args.docs is None else Path(args.docs)
        if docs is not None:
            check_out_dir(docs, key="DOCS")
        mode = "quick" if args.quick else "default"
        spec_path = Path(args.config) if args.config else CONF_DIR / f"{mode}.yaml"
        if not spec_path.is_file():
            raise ConfigError(f"--config={str(spec_path)!r}: no such file")
        spec = OmegaConf.load(spec_path)
        sweeps = build_sweeps(spec, facts, tuple(args.overrides))
        root = out / "sweeps" / f"{spec_path.stem}-{facts['sha']}"
        lock_out_dir(root)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(FIGURES, only, sweeps, facts, spec_path, root, out, docs, args.jobs, echo)
    except KeyboardInterrupt:
        print(f"Error: interrupted; the computed points are kept in {root}; rerun the same command to continue", file=sys.stderr)
        return 130


def lock_out_dir(root: Path) -> None:
    """One ``make figures`` at a time on a folder of points (ConfigError naming the holder)."""
    from .rundir import RunDirBusyError, lock_run_dir

    try:
        lock_run_dir(root)
    except RunDirBusyError:
        raise ConfigError(f"OUT: another make figures is computing points in {root}; wait for it to end") from None


def _run(FIGURES, only, sweeps, facts, spec_path, root, out, docs, jobs, echo) -> int:
    from ..output.plots import pyplot
    from ..output.report import save_figure

    echo(
        f"figures of {facts['path']} (sha256 {facts['sha']}, K={facts['K']}, {facts['L']} MoE layers), "
        f"settings {spec_path}, points in {root}"
    )
    errors: list[str] = []
    done: set[str] = set()
    for number in sorted(only):
        figure = FIGURES[number]
        if number in SUPPORTED and not SUPPORTED[number]():
            echo(f"Note: figure {number} ({figure.name}) skipped: {figure.requires}")
            continue
        if not any(name in sweeps for name in figure.sweeps):
            echo(f"Note: figure {number} ({figure.name}) skipped: {spec_path} has no section {', '.join(figure.sweeps)}")
            continue
        for name in [n for n in figure.sweeps if n in sweeps]:
            if name not in done:
                errors += run_sweep(sweeps[name], root, jobs=jobs, echo=echo)
                done.add(name)
        data = {name: load_points(sweeps[name], root) if name in sweeps else [] for name in figure.sweeps}
        if not any(data.values()):
            echo(f"Note: figure {number} ({figure.name}) not drawn: none of its points were computed")
            continue
        stem = out / f"fig{number}_{figure.name}"
        drawn, rows = figure.draw(data, facts, sweeps)
        save_figure(drawn, stem.with_suffix(".png"))
        if docs is not None:  # a small copy for the README
            atomic_write(docs / f"{stem.name}.png", lambda handle, drawn=drawn: drawn.savefig(handle, format="png", dpi=DOCS_DPI))
        pyplot().close(drawn)
        write_csv(stem.with_suffix(".csv"), rows)
        echo(f"figure {number}: {stem}.png, {stem}.csv" + (f", {docs / stem.name}.png" if docs is not None else ""))
    for error in errors:
        print(f"Error: {error}", file=sys.stderr)
    if errors:
        print(
            f"Error: {len(errors)} point(s) failed; the computed points are kept in {root}; "
            "fix the cause and rerun to compute only the missing ones",
            file=sys.stderr,
        )
    return 1 if errors else 0
