"""One accuracy-vs-energy frontier table and figure from several evaluate.py runs (e.g. the
default checkpoint's and a learned-router checkpoint's), paired over their shared test images
and channel draws (dmoe_torch/output/frontier.py says how).

    python scripts/frontier.py --run outputs/default/eval --run outputs/learned/eval:learned_
    python scripts/frontier.py --run A --run B:learned_:topk,jesa --out outputs/frontier --anchor jesa:0.25

Each --run is DIR[:PREFIX[:FAMILY,...]]: an evaluate.py output directory (results.csv and
per_image.npz), a prefix for its policy labels (its families become PREFIX<family>) and the
families to keep from it (unprefixed names; default all).  The runs must be evaluated on the
same images, channel draws, seed and channel.  Writes frontier.csv, frontier.md and
frontier.png to --out and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmoe_torch.output import frontier  # noqa: E402
from dmoe_torch.output.report import REFERENCE_POLICY  # noqa: E402
from dmoe_torch.utils import atomic_write_text  # noqa: E402


def parse_run(text: str) -> tuple[str, str, list[str] | None]:
    """``DIR[:PREFIX[:FAMILY,...]]`` -> (DIR, PREFIX, families or None)."""
    directory, _, rest = text.partition(":")
    prefix, _, families = rest.partition(":")
    if not directory:
        raise ValueError(f"--run {text!r}: must be DIR[:PREFIX[:FAMILY,...]]")
    return directory, prefix, [f for f in families.split(",") if f] or None


def parse_anchor(text: str) -> tuple[str, float | None] | None:
    """``jesa:0.25`` -> ("jesa", 0.25); ``topk@1`` -> ("topk@1", None); ``""`` -> None."""
    if not text:
        return None
    policy, _, gamma = text.partition(":")
    try:
        return policy, float(gamma) if gamma else None
    except ValueError:
        raise ValueError(f"--anchor {text!r}: must be POLICY[:GAMMA], e.g. jesa:0.25") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="DIR[:PREFIX[:FAMILY,...]]",
        help="an evaluate.py output directory; repeat for each run (the first one unprefixed, usually)",
    )
    parser.add_argument("--out", default="outputs/frontier", help="output directory (default: %(default)s)")
    parser.add_argument("--reference", default=REFERENCE_POLICY, help="policy label of the target (default: %(default)s)")
    parser.add_argument(
        "--drop-pp",
        type=float,
        default=frontier.DEFAULT_DROP_PP,
        help="target = reference accuracy minus this many pp (default: %(default)s)",
    )
    anchor_default = f"{frontier.DEFAULT_ANCHOR[0]}:{frontier.DEFAULT_ANCHOR[1]:g}"
    parser.add_argument(
        "--anchor",
        default=anchor_default,
        help="POLICY[:GAMMA] whose energy the families are compared at; '' for none (default: %(default)s)",
    )
    parser.add_argument(
        "--resamples", type=int, default=frontier.DEFAULT_RESAMPLES, help="paired bootstrap resamples (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        runs = []
        for text in args.run:
            directory, prefix, families = parse_run(text)
            runs.append((directory, *frontier.load_run(directory, prefix, families)))
        rows, per_image = frontier.merge_runs(runs)
        title = "Frontier of " + ", ".join(f"{d} ({p or 'no prefix'})" for d, p, _ in map(parse_run, args.run))
        out = Path(args.out)
        _, markdown = frontier.write_frontier(
            rows,
            per_image,
            out,
            title=title,
            reference=args.reference,
            drop_pp=args.drop_pp,
            anchor=parse_anchor(args.anchor),
            resamples=args.resamples,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(out / "frontier.md", f"# {title}\n\n{markdown}")
    print(markdown)
    print(f"frontier.csv, frontier.md and frontier.png written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
