"""omnivmed-data: dataset tools.

    omnivmed-data tokens data/stage3.json                       # visual tokens per modality
    omnivmed-data tokens mixture.yaml --preset omnivmed-7b-shape --config my_stage3.yaml
    omnivmed-data tokens data.jsonl --model runs/x/stage3/final --set media.prune_threshold=0.05

    omnivmed-data convert slake --input SLAKE/ --out data/slake.jsonl   # official layout -> records
    omnivmed-data validate data/slake.jsonl --data-root SLAKE/            # schema + media on disk
    omnivmed-data clips data/endovis18.jsonl --data-root EndoVis18/ --out clips/ --window 8

`tokens` runs the processor over a data file or mixture, as training reads it (the media
settings of a stage YAML, the packaged stage 3 by default, or of a saved model), and
reports the visual tokens per modality with and without pruning: a table, and
token_stats.json + token_stats.png in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..extras import CHART_MODULE, NO_CHART, installed
from . import DATA_ROOT_HELP


def _processor(args):
    """The processor that counts tokens: the one saved with --model, else --preset's with
    a stage's media settings; `--set media.SETTING=VALUE` overrides a setting."""
    import torch

    from ..configs import packaged_config
    from ..models import build_preset
    from ..processing.processor import OmniVMedProcessor
    from ..training.config import load_stage_config

    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"{args.model}: no saved model here (config.json missing)")
        from ..models import OmniVMedConfig

        config = OmniVMedConfig.from_pretrained(args.model)
        processor = OmniVMedProcessor.from_pretrained(args.model, config)
    else:
        config_file = Path(args.config) if args.config else packaged_config("stage3")
        options = load_stage_config(config_file, name="tokens").media
        with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
            model, tokenizer = build_preset(args.preset)
        processor = OmniVMedProcessor(model.config, tokenizer, options)
    changes = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("media."):
            raise ValueError(f"--set {item!r}: expected media.SETTING=VALUE")
        changes[key.removeprefix("media.")] = yaml.safe_load(value)
    return processor.with_options(processor.options.replace(**changes)) if changes else processor


def _records(path: Path, root: str | None, processor):
    from ..data import load_mixture, load_records

    if path.suffix in (".yaml", ".yml"):
        return [
            r for part in load_mixture(path, processor, on_error="skip").parts for r in part.records
        ]
    return load_records(path, root, on_error="skip")


def tokens(args) -> int:
    from ..data.files import output_folder
    from ..prep.token_stats import token_statistics, write_report

    out = output_folder(args.out)
    processor = _processor(args)
    options = processor.options
    records = _records(Path(args.data), args.data_root, processor)
    rows, failed = token_statistics(records, processor)
    if not rows:  # a table of nothing would read as "no visual tokens"
        why = f": {failed[0][1]}" if failed else " (no sample has media)"
        raise ValueError(f"{args.data}: none of the {len(records)} samples could be read{why}")
    name = args.model or args.preset
    title = (f"{Path(args.data).name}: {name}, <= {options.max_pixels} px/frame, "
             f"threshold {options.prune_threshold}")  # fmt: skip
    json_path, png_path = write_report(rows, out, title)
    print(f"{'modality':<14}{'items':>7}{'tokens/item':>13}{'pruned/item':>13}{'reduction':>11}")
    for r in rows:
        print(f"{r.modality:<14}{r.items:>7}{r.unpruned / r.items:>13.0f}{r.pruned / r.items:>13.0f}"
              f"{100 * r.reduction:>10.1f}%")  # fmt: skip
    total_full, total_kept = sum(r.unpruned for r in rows), sum(r.pruned for r in rows)
    if total_full:
        print(
            f"{'all':<14}{sum(r.items for r in rows):>7}{'':>26}{100 * (1 - total_kept / total_full):>10.1f}%"
        )
    if failed:
        named = "; ".join(why for _, why in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        print(f"{len(failed)} samples could not be read and were left out: {named}{more}")
    print(f"wrote {json_path} and {png_path}" if png_path else f"wrote {json_path}; {NO_CHART}")
    return 0


def convert(args) -> int:
    from ..data.records import summary_path
    from ..prep.converters import convert_dataset

    summary = convert_dataset(args.source, args.input, args.out, strict=args.strict)
    print(f"{summary['dataset']}: {summary['records']} records -> {summary['output']} "
          f"(sha256 {summary['sha256'][:16]}...; data root {summary['data_root']})")  # fmt: skip
    expected = summary["expected_counts"] or {}
    for split, n in summary["counts"]["split"].items():
        doc = f" (documented: {expected[split]})" if split in expected else ""
        print(f"  {split:<10}{n:>8}{doc}")
    for key in ("modality", "question_type", "answer_type", "language"):
        print(f"  {key}: {summary['counts'][key]}")
    if summary["matches_documented_counts"] is False:
        print("  WARNING: the split counts differ from the documented ones (see docs/datasets.md)")
    if summary["images_in_several_splits"]:
        print(f"  {summary['images_in_several_splits']} images are shared across splits (the "
              "release splits questions, not images)")  # fmt: skip
    for reason, n in summary["left_out_by_rule"].items():
        print(f"  left out {n} entries by the source's rule: {reason}")
    for file, n in summary["problems"].items():
        named = summary["problem_examples"][file]
        more = f"; and {n - len(named)} more" if n > len(named) else ""
        print(f"  skipped {n} entries of {file}: {'; '.join(named)}{more}")
    if summary["refused_files"]:
        print(f"  refused {summary['refused_files']} files unread (links leading outside "
              f"{summary['data_root']}, or not regular files): "
              + "; ".join(summary["refused_examples"]))  # fmt: skip
    print(f"summary: {summary_path(summary['output'])}")
    return 0


def mix(args) -> int:
    from ..prep.mix import build_mix

    splits = None
    if args.splits is not None:
        splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    summary = build_mix(args.mixture, args.out, splits)
    print(f"{summary['records']} samples -> {summary['output']} (data root {summary['data_root']})")
    left_out = ", ".join(f"{n} {split}" for split, n in summary["left_out_by_split"].items())
    print(f"splits: {', '.join(summary['splits'])} only"
          + (f"; left out {left_out} records (--splits to include them)" if left_out else "")
          + (f"; kept {summary['without_split']} records without a split field"
             if summary["without_split"] else ""))  # fmt: skip
    print(f"{'source':<48}{'records':>9}{'duplicates':>12}{'drawn':>8}")
    for s in summary["sources"]:
        note = "  (upsampled)" if s["upsampled"] else ""
        print(
            f"{Path(s['path']).name:<48}{s['records']:>9}{s['duplicates']:>12}{s['drawn']:>8}{note}"
        )
    for key in ("modality", "task", "dataset"):
        print(f"{key}: {summary[key]}")
    wrote = f"wrote {Path(args.out) / 'mixture.summary.json'}"
    print(f"{wrote} and {Path(args.out) / 'distribution.png'}" if installed(CHART_MODULE)
          else f"{wrote}; {NO_CHART}")  # fmt: skip
    return 0


def _backend(spec: str, model: str | None, args):
    if spec.startswith(("http://", "https://")):
        from ..prep.captions.http import HttpBackend

        return HttpBackend(spec, model or "default", args.api_key, args.timeout, args.retries)
    from ..prep.captions.local import LocalBackend

    if not (Path(spec) / "config.json").is_file():
        raise ValueError(f"{spec}: neither an http(s) URL nor a saved model folder")
    return LocalBackend(spec)


def captions(args) -> int:
    from ..data.records import default_data_root
    from ..prep.captions.pipeline import CaptionSettings, run_captions

    settings = CaptionSettings(candidates=args.candidates, threshold=args.threshold,
                               temperature=args.temperature, judge_retries=args.judge_retries,
                               concurrency=args.concurrency)  # fmt: skip
    judges = [_backend(j, args.judge_model, args) for j in args.judge]
    summary = run_captions(args.clips, args.root or default_data_root(args.clips),
                           _backend(args.generator, args.generator_model, args), judges, args.out, settings)  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def clips(args) -> int:
    from ..prep.clips import ClipSettings, cut_clips

    settings = ClipSettings(window=args.window, stride=args.stride, edge=args.edge,
                            format=args.format, fps=args.fps, link_frames=args.link)  # fmt: skip
    summary = cut_clips(args.records, args.data_root, args.out, settings, args.source_video)
    print(f"{summary['clips']} clips ({summary['clips_reused']} kept from an earlier run) around "
          f"{summary['annotated_frames']} annotated frames; {summary['clip_records']} clip "
          f"records -> {Path(args.out) / 'clip_records.jsonl'} (data root {summary['data_root']})")  # fmt: skip
    for reason, n in summary["skipped"].items():
        if n:
            print(f"  left out {n} frames: {reason.replace('_', ' ')} "
                  f"(e.g. {summary['skipped_examples'][reason][0]})")  # fmt: skip
    return 0


def validate(args) -> int:
    from ..prep.validate import validate_file

    report = validate_file(args.data, args.data_root, read_media=not args.no_read)
    print(f"{report['file']}: {report['valid_records']} of {report['records']} records parse; "
          f"media {report['media']} in {report['media_files']} files")  # fmt: skip
    for problem in report["problems"][:50]:
        print(f"  {problem}")
    if len(report["problems"]) > 50:
        print(f"  ... and {len(report['problems']) - 50} more")
    print("OK" if not report["problems"] else f"{len(report['problems'])} problems")
    return 0 if not report["problems"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokens", help="visual tokens per modality, with and without pruning")
    tok.add_argument("data", help="a .json/.jsonl data file or a YAML mixture")
    tok.add_argument("--data-root", help=DATA_ROOT_HELP)
    which = tok.add_mutually_exclusive_group()
    which.add_argument("--preset", default="omnivmed-1.5b-shape",
                       help="model architecture (default: omnivmed-1.5b-shape, SigLIP so400m)")  # fmt: skip
    which.add_argument("--model", help="a saved model folder (its architecture and media settings)")
    tok.add_argument("--config", help="a stage YAML whose media settings to use (default: stage3)")
    tok.add_argument("--set", action="append", metavar="media.KEY=VALUE")
    tok.add_argument("--out", default="token_stats", help="folder for token_stats.json/.png")
    from ..prep.converters import converter_names

    conv = sub.add_parser("convert", help="a public dataset's release -> instruction records")
    conv.add_argument("source", help=", ".join(converter_names()))
    conv.add_argument("--input", required=True, help="the release, unpacked")
    conv.add_argument("--out", required=True, help="JSONL output (a .summary.json beside it)")
    conv.add_argument("--strict", action="store_true", help="stop at the first malformed entry")
    mx = sub.add_parser(
        "mix", help="one deduplicated training file from a YAML mixture, with its distribution"
    )
    mx.add_argument("mixture", help="a YAML mixture (datasets with path, root, ratio)")
    mx.add_argument("--out", required=True, help="folder for mixture.jsonl, its summary and plot")
    mx.add_argument("--splits", metavar="SPLIT[,SPLIT...]",
                    help="the records' splits to draw from (default: the mixture's 'splits', "
                    "else train; records without a split field are always kept)")  # fmt: skip
    cap = sub.add_parser("captions", help="rejection-sampled captions for video clips (Fig. 4)")
    cap.add_argument("clips", help='JSONL of {"id": ..., "video": file or frame folder}')
    cap.add_argument(
        "--root", help="clip paths resolve here (default: as --data-root of the other commands)"
    )
    cap.add_argument(
        "--generator", required=True, help="an OpenAI-compatible base URL (…/v1) or a model folder"
    )
    cap.add_argument("--generator-model")
    cap.add_argument(
        "--judge", action="append", required=True, help="a judge: URL or model folder (repeat)"
    )
    cap.add_argument("--judge-model")
    cap.add_argument("--api-key")
    cap.add_argument("--candidates", type=int, default=4)
    cap.add_argument("--threshold", type=float, default=4.0, help="mean judge score to keep (1-5)")
    cap.add_argument("--temperature", type=float, default=0.8)
    cap.add_argument("--judge-retries", type=int, default=2)
    cap.add_argument("--concurrency", type=int, default=8)
    cap.add_argument("--timeout", type=float, default=60.0)
    cap.add_argument("--retries", type=int, default=3)
    cap.add_argument("--out", required=True)
    clp = sub.add_parser("clips", help="short clips around the annotated frames of surgical VQA")
    clp.add_argument("records", help="a converted frame-level file (endovis18-vqa, ...)")
    clp.add_argument("--data-root", help=DATA_ROOT_HELP)
    clp.add_argument("--out", required=True, help="folder for the clips and their records")
    clp.add_argument("--window", type=int, default=8, help="frames per clip (default 8)")
    clp.add_argument("--stride", type=int, default=1, help="source frames between clip frames")
    clp.add_argument("--edge", choices=("shift", "skip"), default="shift",
                     help="near a sequence's ends: move the window inside it, or leave the frame out")  # fmt: skip
    clp.add_argument("--format", choices=("frames", "mp4"), default="frames")
    clp.add_argument("--source-video", metavar="TEMPLATE",
                     help="cut from recorded videos instead, e.g. 'videos/video{sequence:0>2}.mp4' "
                     "({sequence}: the frame folder's name; frames named by frame number)")  # fmt: skip
    clp.add_argument("--fps", type=float,
                     help="mp4 frame rate (default: a video's own rate, or 1 for frame images, divided by --stride)")  # fmt: skip
    clp.add_argument("--link", action="store_true",
                     help="hard-link the release's frames instead of copying them (a frame edited in place then changes both)")  # fmt: skip
    val = sub.add_parser("validate", help="check a data file and its media without training")
    val.add_argument("data")
    val.add_argument("--data-root", help=DATA_ROOT_HELP)
    val.add_argument("--no-read", action="store_true", help="check existence only, not readability")
    args = parser.parse_args(argv)
    try:
        return {
            "tokens": tokens,
            "convert": convert,
            "mix": mix,
            "captions": captions,
            "clips": clips,
            "validate": validate,
        }[args.command](args)
    except (ValueError, OSError) as exc:  # bad settings, data or model folders
        print(f"omnivmed-data: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
