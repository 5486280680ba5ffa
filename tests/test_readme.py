"""README.md as a user meets it: its code runs, its quick run works, its links resolve.

Every ```python block of the README runs as written (tiny sizes, CPU); the one-minute run
(the ```bash block under "A one-minute run") runs on fewer images; every relative link and
anchor of README.md and docs/*.md points to a file and heading that exist.  The help texts of
conf/hydra/help/ name keys but never restate the defaults of conf/ (which would go stale).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dmoe_torch.data import DEBIAN_FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of README.md in ``language``."""
    text = README.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(2)) for match in FENCE.finditer(text) if match.group(1) == language
    ]


PYTHON_BLOCKS = code_blocks("python")


def test_the_readme_shows_python_for_routing_the_layer_and_a_model():
    code = "\n".join(block for _, block in PYTHON_BLOCKS)
    for call in ("jesa(", "route(", "MoELayer(", "ConvMoEClassifier("):
        assert call in code, call


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_every_python_block_of_the_readme_runs(line, code):
    torch.manual_seed(0)  # the blocks draw random tensors; their asserts hold for any draw
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


# --------------------------------------------------------------------------------------------
# The one-minute run, on fewer images


QUICK_RUN_HEADING = "### A one-minute run"


def quick_run_commands() -> list[list[str]]:
    """The entry-point command lines of the README's one-minute run, split into words."""
    text = README.read_text()
    assert QUICK_RUN_HEADING in text
    section = re.split(r"^#", text.split(QUICK_RUN_HEADING, 1)[1], maxsplit=1, flags=re.M)[0]
    blocks = [match.group(2) for match in FENCE.finditer(section) if match.group(1) == "bash"]
    assert len(blocks) == 1, f"one ```bash block under {QUICK_RUN_HEADING!r}"
    return [shlex.split(line) for line in blocks[0].splitlines() if line.startswith(".venv/bin/python ")]


def smaller(words: list[str], **values: str) -> list[str]:
    """``words`` with each key of ``values`` set to its value (replaced, or appended)."""
    keys = {key.replace("__", "."): value for key, value in values.items()}
    kept = [w for w in words if w.split("=", 1)[0] not in keys]
    return kept + [f"{key}={value}" for key, value in keys.items()]


def test_the_one_minute_run_trains_then_evaluates_every_policy(tmp_path):
    if not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {DEBIAN_FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    train, evaluate = quick_run_commands()
    assert train[1:3] == ["train.py", "+experiment=quick"] and evaluate[1] == "evaluate.py"
    run_dir = next(w.split("=", 1)[1] for w in train if w.startswith("hydra.run.dir="))
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1"}
    (tmp_path / "data").mkdir()  # filled from the Debian package's files on first use
    fewer = {"data__root": str(tmp_path / "data"), "device": "cpu", "progress": "false"}
    for words, values in (
        (train, {"data__limit_train": "300", "data__limit_test": "100"}),
        (evaluate, {"data__limit_test": "100"}),
    ):
        # The README's own paths, moved under tmp_path; python is this interpreter.
        args = [w.replace(run_dir, str(tmp_path / run_dir)) for w in words[1:]]
        result = subprocess.run(
            [sys.executable, *smaller(args, **values, **fewer)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / run_dir / "checkpoint.pt").is_file()
    eval_dir = next(w.split("=", 1)[1] for w in evaluate if w.startswith("hydra.run.dir="))
    assert (tmp_path / eval_dir / "results.md").is_file()  # where the README says the table is
    with open(tmp_path / eval_dir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    policies = OmegaConf.load(REPO / "conf" / "evaluate.yaml").eval.policies
    assert {row["policy"] for row in rows} == set(policies)  # every default policy has its row
    energy = {row["policy"]: float(row["energy_uj_mean"]) for row in rows}
    assert energy["none"] == 0 and all(e > 0 for policy, e in energy.items() if policy != "none")
    assert {int(row["inputs"]) for row in rows} == {100}


# --------------------------------------------------------------------------------------------
# Links


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())  # a '#' comment inside a code block is no heading
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def relative_links() -> list[tuple[str, Path, str]]:
    """(where, target file, anchor or '') of every relative link of README.md and docs/*.md."""
    links = []
    for path in DOCS:
        for number, line in enumerate(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text()).splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto: not checked offline
                file, _, fragment = target.partition("#")
                links.append((f"{path.relative_to(REPO)}:{number}", (path.parent / file).resolve() if file else path, fragment))
    return links


LINKS = relative_links()


def test_the_readme_links_its_three_documents():
    targets = {target for where, target, _ in LINKS if where.startswith("README.md")}
    assert {REPO / "docs" / name for name in ("method.md", "results.md", "architecture.md")} <= targets


@pytest.mark.parametrize("where,target,fragment", LINKS, ids=[f"{w} {t.name}#{f}" for w, t, f in LINKS])
def test_every_relative_link_points_to_a_file_and_heading_that_exist(where, target, fragment):
    assert target.exists(), f"{where}: {target} does not exist"
    if fragment:
        assert fragment in anchors(target), f"{where}: no heading #{fragment} in {target.name}"


REPO_PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|conf|docs|examples|scripts|tests|dmoe_torch)/[\w./-]*)")


def test_every_repository_path_and_make_target_the_readme_names_exists():
    text = README.read_text()
    paths = {path.rstrip(".") for path in REPO_PATH.findall(text)}
    assert {"examples/channel_energies.py", "scripts/setup.sh"} <= paths
    missing = sorted(path for path in paths if not (REPO / path).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"
    targets = set(re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z]+)\b", text))
    assert {"run", "test"} <= named and named <= targets, sorted(named - targets)


# --------------------------------------------------------------------------------------------
# Help texts


HELP_KEY = re.compile(r"^    ([a-z_][\w.]*)=(\S+)\s{2,}", re.M)


def compose_config(name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=["ckpt=x"] if name == "evaluate" else [])


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_the_help_text_names_keys_not_their_defaults(name):
    """A default restated in the help ('seed=0') goes stale when conf/ changes; the help
    prints the composed config anyway."""
    header = OmegaConf.load(REPO / "conf" / "hydra" / "help" / f"{name}.yaml").header
    config = compose_config(name)
    shown = HELP_KEY.findall(header)
    restated = [
        f"{key}={value}" for key, value in shown if str(OmegaConf.select(config, key, default="<none>")).lower() == value.lower()
    ]
    assert not restated, f"conf/hydra/help/{name}.yaml restates the defaults {restated}"
