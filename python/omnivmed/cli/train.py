"""`omnivmed-train`: train one stage, a chain of stages, or (with no arguments) the demo.

    omnivmed-train                                             # the demo, on CPU, into ./omnivmed-demo/
    omnivmed-train --config stage1.yaml --data train.json --output-dir runs/s1
    omnivmed-train --stages 1,2,3 --preset tiny --data-dir data/ --output-dir runs/x
    deepspeed --num_gpus 8 $(which omnivmed-train) --stages 1,2,3 ...
    deepspeed --hostfile hosts --num_nodes 2 $(which omnivmed-train) ...   # several nodes

With --stages, stage N reads <data-dir>/stageN.json (or .jsonl / .yaml mixture) and starts
from stage N-1's exported model. Interrupted runs resume from their newest complete
checkpoint (disable with --no-resume).

The demo writes into --output-dir (default ./omnivmed-demo): its data in data/, each
stage in stageN/ and the final model in stage3/final.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from ..configs import packaged_config
from ..data.files import output_folder
from ..extras import TRAIN_MODULES, MissingExtraError, require
from ..training.checkpoint import CheckpointError
from ..training.config import (
    ConfigError,
    StageConfig,
    check_records,
    check_stage_order,
    load_stage_config,
    yaml_problem,
)
from ..training.outputs import new_folders, remove_unused
from .quiet import quiet_deepspeed_op_builds

DEMO_OUTPUT = "omnivmed-demo"

logger = logging.getLogger("omnivmed.train")


def _find_data(data_dir: Path, stage: int) -> str:
    for suffix in (".json", ".jsonl", ".yaml", ".yml"):
        path = data_dir / f"stage{stage}{suffix}"
        if path.is_file():
            return str(path)
    raise ConfigError(f"no data file stage{stage}.json/.jsonl/.yaml in {data_dir}")


def stage_file(given: str) -> Path:
    """A --config argument: a YAML file, or the name of a packaged stage config (e.g.
    medmvl_finetune_2d)."""
    path = Path(given)
    if path.exists() or path.suffix:
        return path
    try:
        return packaged_config(given)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"--config {given}: neither a file nor a packaged config ({exc})"
        ) from None


def plan_stages(args) -> list[StageConfig]:
    """Every stage's config, validated (files, keys, order) before anything trains."""
    stages: list[StageConfig] = []
    if args.config:
        for i, given in enumerate(args.config):
            path = stage_file(given)
            cfg = load_stage_config(path, data=args.data if i == 0 else None,
                                    output_dir=str(Path(args.output_dir) / Path(path).stem) if args.output_dir else None)  # fmt: skip
            stages.append(cfg)
    else:
        numbers = [int(s) for s in args.stages.split(",")]
        prefix = "medmvl_stage" if args.recipe == "medmvl" else "stage"
        for n in numbers:
            stages.append(load_stage_config(
                packaged_config(f"{prefix}{n}"),
                data=_find_data(Path(args.data_dir), n), output_dir=str(Path(args.output_dir) / f"stage{n}"),
                name=f"stage{n}", init=f"preset:{args.preset}" if n == numbers[0] else "previous",
            ))  # fmt: skip
    overrides, media = {}, {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: {yaml_problem(exc)}") from None
        if key.startswith("media."):  # one media setting, e.g. --set media.max_pixels=200704
            media[key.removeprefix("media.")] = parsed
        elif stages and key not in stages[0].allowed_keys:
            raise ConfigError(
                f"--set {key}: unknown key; allowed keys: {sorted(stages[0].allowed_keys)} "
                "and media.<setting>"
            )
        else:
            overrides[key] = parsed
    if overrides or media:  # rebuilt, so every rule and conversion of the config applies again
        stages = [
            dataclasses.replace(
                cfg, **overrides,
                **({"media": {**dataclasses.asdict(cfg.media), **media}} if media else {}),
            )
            for cfg in stages
        ]  # fmt: skip
    check_stage_order(stages)
    outputs = [str(Path(c.output_dir).resolve()) for c in stages]
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"stages share an output_dir ({outputs}); give each stage its own")
    for cfg in stages:
        output_folder(
            cfg.output_dir, "--output-dir" if args.output_dir else f"stage {cfg.name!r}: output_dir"
        )
        if not Path(cfg.data).is_file():
            raise ConfigError(f"stage {cfg.name!r}: data file {cfg.data!r} does not exist")
        if (
            cfg.init not in ("previous",)
            and not cfg.init.startswith("preset:")
            and not Path(cfg.init).is_dir()
        ):
            raise ConfigError(
                f"stage {cfg.name!r}: init {cfg.init!r} is not a preset or a saved model directory"
            )
    for cfg in stages:  # last: reads every record of every stage
        check_records(cfg)
    return stages


def run_stages(
    stages: list[StageConfig], resume: bool = True, allow_changed: list[str] | tuple = ()
) -> Path:
    from ..training.plots import plot_losses
    from ..training.trainer import train_stage

    previous = None
    for cfg in stages:
        if cfg.init == "previous":
            cfg.init = str(previous)
        previous = train_stage(cfg, resume=resume, allow_changed=allow_changed)
    if int(os.environ.get("RANK", "0")) == 0:
        png = plot_losses([Path(c.output_dir) / "metrics.jsonl" for c in stages],
                          Path(stages[-1].output_dir).parent / "loss_curves.png")  # fmt: skip
        print(f"loss curves: {png}")
    return previous


def run_demo(output_dir: Path) -> None:
    from ..demo import DEMO_MEDIA_SETTINGS, build_demo_dataset
    from ..inference import answer_question, load_for_inference
    from ..models import VisualKind

    start = time.perf_counter()
    paths = build_demo_dataset(output_dir / "data")
    print(f"demo data: {output_dir / 'data'}")
    demo_epochs = {1: 20, 2: 30, 3: 20}
    stages = []
    for n in (1, 2, 3):
        cfg = load_stage_config(packaged_config(f"stage{n}"), data=str(paths[f"stage{n}"]),
                                output_dir=str(output_dir / f"stage{n}"), name=f"stage{n}",
                                init="preset:tiny" if n == 1 else "previous", epochs=demo_epochs[n],
                                lr=3e-3, module_lr={}, media=DEMO_MEDIA_SETTINGS[n])  # fmt: skip
        stages.append(cfg)
    final = run_stages(stages)
    # As a user would: the exported folder alone (weights, tokenizer, processor settings).
    model, processor = load_for_inference(final, device="cpu")
    print("\nquestions after stage 3:")
    for kind, key, question in ((VisualKind.IMAGE, "image", "What is the imaging modality?"),
                                (VisualKind.VOLUME, "volume", "What is shown?"),
                                (VisualKind.VIDEO, "video", "What is shown?")):  # fmt: skip
        ans = answer_question(model, processor, kind, paths[key], question)
        print(f"- {kind.name.lower():6s} {paths[key].name}: {question!r} -> {ans.text!r}  "
              f"[visual tokens: {ans.visual_tokens} with pruning, {ans.visual_tokens_unpruned} without]")  # fmt: skip
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; model: {final}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", nargs="+",
                        help="stage YAML file(s) or packaged config name(s), run in order")  # fmt: skip
    parser.add_argument("--data", help="data file for the (first) --config stage")
    parser.add_argument("--stages", help="comma-separated packaged stages, e.g. 1,2,3")
    parser.add_argument("--recipe", choices=["omnivmed", "medmvl"], default="omnivmed")
    parser.add_argument("--preset", default="tiny", help="model preset the first stage starts from")
    parser.add_argument("--data-dir", help="with --stages: folder holding stageN.json")
    parser.add_argument("--output-dir", default=None,
                        help=f"where to write (the demo: ./{DEMO_OUTPUT}; --stages: runs/omnivmed; "
                        "--config: each stage's output_dir, or <dir>/<config name>)")  # fmt: skip
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting of every stage"
    )
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument(
        "--allow-changed", default="", metavar="KEY[,KEY]",
        help="settings that may differ from the checkpoint's when resuming (e.g. lr,epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    args = parser.parse_args(argv)
    try:  # before anything is built or written: DeepSpeed is an extra
        require("train", TRAIN_MODULES, "omnivmed-train")
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 2
    quiet_deepspeed_op_builds()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    created: list[Path] = []
    try:
        if not args.config and not args.stages:
            demo_dir = output_folder(args.output_dir or DEMO_OUTPUT, "--output-dir")
            created = new_folders([demo_dir])
            run_demo(demo_dir)
            return 0
        if args.stages and not args.data_dir:
            raise ConfigError("--stages needs --data-dir")
        if args.stages:
            args.output_dir = args.output_dir or "runs/omnivmed"
        stages = plan_stages(args)
        allow = [k for k in args.allow_changed.split(",") if k]
        unknown = sorted(set(allow) - set(stages[0].allowed_keys)) if stages else []
        if unknown:
            raise ConfigError(f"--allow-changed: unknown settings {unknown}")
        created = new_folders([cfg.output_dir for cfg in stages])
        run_stages(stages, resume=not args.no_resume, allow_changed=allow)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError, FloatingPointError) as exc:
        _remove_unused(created)
        print(f"omnivmed-train: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        _remove_unused(created)
        raise
    return 0


def _remove_unused(created: list[Path]) -> None:
    """After a failed run, rank 0 removes the folders this run made that hold nothing
    worth keeping (a later step's checkpoints and logs stay, for the resume)."""
    if int(os.environ.get("RANK", "0")) == 0:
        remove_unused(created)


if __name__ == "__main__":
    raise SystemExit(main())
