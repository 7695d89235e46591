"""omnivmed-data: dataset tools.

    omnivmed-data tokens data/stage3.json                       # visual tokens per modality
    omnivmed-data tokens mixture.yaml --preset omnivmed-7b-shape --config my_stage3.yaml
    omnivmed-data tokens data.jsonl --model runs/x/stage3/final --set media.prune_threshold=0.05

`tokens` runs the processor over a data file or mixture, as training reads it (the media
settings of a stage YAML, the packaged stage 3 by default, or of a saved model), and
reports the visual tokens per modality with and without pruning: a table, and
token_stats.json + token_stats.png in --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _media_settings(args):
    from ..configs import packaged_config
    from ..processing.options import ProcessorOptions
    from ..training.config import load_stage_config

    if args.model:
        options = ProcessorOptions.from_dir(args.model)
    else:
        config = Path(args.config) if args.config else packaged_config("stage3")
        options = load_stage_config(config, name="tokens").media
    changes = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("media."):
            raise ValueError(f"--set {item!r}: expected media.SETTING=VALUE")
        changes[key.removeprefix("media.")] = yaml.safe_load(value)
    return options.replace(**changes) if changes else options


def _model_config(args):
    """The architecture's config (patch size, connector, strategy decide token counts)."""
    import torch

    from ..models import build_preset

    if args.model:
        from transformers import AutoTokenizer

        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"{args.model}: no saved model here (config.json missing)")
        from ..models import OmniVMedConfig

        return OmniVMedConfig.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        model, tokenizer = build_preset(args.preset)
    return model.config, tokenizer


def _records(path: Path, root: str | None, processor):
    from ..data import load_mixture, load_records

    if path.suffix in (".yaml", ".yml"):
        return [
            r for part in load_mixture(path, processor, on_error="skip").parts for r in part.records
        ]
    return load_records(path, root, on_error="skip")


def tokens(args) -> int:
    from ..data.token_stats import token_statistics, write_report
    from ..processing.processor import OmniVMedProcessor

    options = _media_settings(args)
    config, tokenizer = _model_config(args)
    processor = OmniVMedProcessor(config, tokenizer, options)
    records = _records(Path(args.data), args.data_root, processor)
    rows, failed = token_statistics(records, processor)
    name = args.model or args.preset
    title = (f"{Path(args.data).name}: {name}, <= {options.max_pixels} px/frame, "
             f"threshold {options.prune_threshold}")  # fmt: skip
    json_path, png_path = write_report(rows, Path(args.out), title)
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
        print(f"{len(failed)} samples could not be read and were left out: {failed[:10]}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokens", help="visual tokens per modality, with and without pruning")
    tok.add_argument("data", help="a .json/.jsonl data file or a YAML mixture")
    tok.add_argument("--data-root", help="media root of a data file (default: its folder)")
    which = tok.add_mutually_exclusive_group()
    which.add_argument("--preset", default="omnivmed-1.5b-shape",
                       help="model architecture (default: omnivmed-1.5b-shape, SigLIP so400m)")  # fmt: skip
    which.add_argument("--model", help="a saved model folder (its architecture and media settings)")
    tok.add_argument("--config", help="a stage YAML whose media settings to use (default: stage3)")
    tok.add_argument("--set", action="append", metavar="media.KEY=VALUE")
    tok.add_argument("--out", default="token_stats", help="folder for token_stats.json/.png")
    args = parser.parse_args(argv)
    try:
        return tokens(args)
    except (ValueError, OSError) as exc:  # bad settings, data or model folders
        print(f"omnivmed-data: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
