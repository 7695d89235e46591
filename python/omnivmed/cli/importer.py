"""omnivmed-import: a model released by another project, as downloaded, into an omnivmed
model folder that omnivmed-infer, -eval, -serve and -train read.

    omnivmed-import medm-vl MedM-VL-2D-3B-en --out medmvl-2d
    omnivmed-infer medmvl-2d --image fundus.png -q "What is the main finding?"

The families it reads are listed below; each has its own options (omnivmed-import FAMILY -h).
A release that cannot be imported as it is gets a one-line error (exit 2) and no output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..importers import IMPORTERS, ReleaseError


def build_parser() -> argparse.ArgumentParser:
    families = "\n".join(f"  {name:<12} {imp.summary}" for name, imp in IMPORTERS.items())
    parser = argparse.ArgumentParser(
        prog="omnivmed-import", description=__doc__, epilog=f"families:\n{families}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="family", metavar="FAMILY", required=True)
    for name, importer in IMPORTERS.items():
        one = sub.add_parser(name, help=importer.summary, description=importer.summary)
        one.add_argument("source", metavar="SRC", help="the release folder as downloaded")
        one.add_argument(
            "--out", required=True, metavar="DST", help="the model folder to write (new)"
        )
        one.add_argument("--json", action="store_true", help="print the summary as JSON")
        importer.add_arguments(one)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # what it does and the families it reads
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    importer = IMPORTERS.get(args.family)
    try:
        summary = importer.import_release(
            Path(args.source), Path(args.out), **importer.options_from_args(args)
        )
    except ReleaseError as exc:
        print(f"omnivmed-import: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.out}: {summary['weights']} weights from {args.source}")
        for name, why in summary.get("unused", {}).items():
            print(f"  unused: {name} ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
