"""omnivmed-eval: answer a benchmark with a saved model (`run`) and score predictions
against references with a written metric profile (`score`, no model needed).

    omnivmed-eval run MODEL --benchmark REF.jsonl --out DIR [--blank-visual]
    torchrun --nproc-per-node 8 -m omnivmed.cli.eval run MODEL --benchmark REF.jsonl --out DIR
    omnivmed-eval score --references REF.jsonl --predictions DIR/predictions.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import DATA_ROOT_HELP


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omnivmed-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer every question of a benchmark")
    run.add_argument("model", help="a folder exported by omnivmed-train")
    run.add_argument("--benchmark", required=True, help="JSONL/JSON reference records")
    run.add_argument("--data-root", help=DATA_ROOT_HELP)
    run.add_argument("--out", required=True)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--blank-visual", action="store_true",
                     help="every pixel black: shows how much answers depend on the image")  # fmt: skip
    run.add_argument("--device", default="auto")
    run.add_argument("--batch-size", type=int, default=8, help="records per generate call")
    run.add_argument("--limit", type=int, help="only the first N records")
    run.add_argument("--score", metavar="PROFILE", help="score the predictions afterwards")
    run.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                     help="skip: leave out records whose media or prompt is bad (counted and "
                     "named; scored as missing) instead of stopping")  # fmt: skip
    score = sub.add_parser("score", help="score predictions against references")
    score.add_argument("--references", required=True)
    score.add_argument("--predictions", required=True)
    score.add_argument("--profile", default="strict")
    score.add_argument("--out", required=True)
    score.add_argument("--metrics", help="comma-separated metric names to keep (default: all)")
    score.add_argument("--baseline", metavar="PRED.jsonl",
                       help="a second prediction set (e.g. a --blank-visual run) reported beside")  # fmt: skip
    score.add_argument("--bertscore-model", help="local model folder for BERTScore (m3d profile)")
    score.add_argument("--bertscore-layers", type=int, help="its layer (default: the last)")
    sub.add_parser("profiles", help="list the scoring profiles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="omnivmed-eval: %(message)s")
    from omnivmed.evaluation.profiles import PROFILES, ScoringError, load_profiles
    from omnivmed.evaluation.scoring import score_files

    try:
        if args.command == "profiles":
            load_profiles()
            for name, cls in sorted(PROFILES.items()):
                print(f"{name:<10} version {cls.version}: {', '.join(cls.metrics)}")
            return 0
        if args.command == "run":
            from omnivmed.evaluation.generate import run_benchmark

            for flag in ("max_new_tokens", "batch_size"):
                if getattr(args, flag) < 1:
                    raise ValueError(
                        f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
                    )
            result = run_benchmark(args.model, args.benchmark, args.out, data_root=args.data_root,
                                   max_new_tokens=args.max_new_tokens, blank_visual=args.blank_visual,
                                   device=args.device, limit=args.limit, batch_size=args.batch_size,
                                   on_error=args.on_error)  # fmt: skip
            predictions = result.predictions
            print(f"predictions: {predictions}")
            print(f"answered {result.answered} records, skipped {len(result.skipped)}"
                  + "".join(f"\n  skipped {s['id']}: {s['error']}" for s in result.skipped))  # fmt: skip
            if args.score:
                summary = score_files(
                    args.benchmark, predictions, args.score, Path(args.out) / "scores"
                )
                print(json.dumps(summary["overall"], indent=2))
            return 0
        options = {k: v for k in ("bertscore_model", "bertscore_layers") if (v := getattr(args, k))}
        metrics = (
            [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        )
        summary = score_files(args.references, args.predictions, args.profile, args.out,
                              metrics=metrics, baseline=args.baseline, **options)  # fmt: skip
        shown = {"overall": summary["overall"], "counts": summary["counts"]}
        if "baseline" in summary:
            shown["baseline"] = summary["baseline"]["overall"]
        print(json.dumps(shown, indent=2))
        for note in summary["notes"]:
            print(f"note: {note}")
        return 0
    except (ScoringError, FileNotFoundError, ValueError) as exc:
        print(f"omnivmed-eval: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
