"""`omnivmed-eval run`: answer every question of a benchmark with a saved model.

Predictions are appended (and flushed to disk) one by one, so an interrupted run resumes
where it stopped and never answers an id twice. Under `torchrun` each rank answers its
shard (every world-size-th record) into its own file and rank 0 merges them, in the
benchmark's order, into `predictions.jsonl`. `blank_visual` answers the same questions
with every pixel black (same token layout as the real media), to show how much the
answers depend on the image.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.records import Record, load_records
from ..distributed import barrier, join_launched_group
from ..inference.generate import Prompt, Sampling, build_prompt, generate
from ..processing.processor import Media, OmniVMedProcessor
from ..run_folder import RUN_FILE
from .profiles import ScoringError


def _question(record: Record) -> str:
    for turn in record.conversations:
        if turn.get("from", turn.get("role")) in ("human", "user"):
            return turn["value"]
    raise ScoringError(f"sample {record.id!r}: no human turn holds the question")


def _part_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("predictions.rank*.jsonl")) + sorted(
        out_dir.glob("predictions.partial.jsonl")
    )


def _done_ids(path: Path, repair: bool = True) -> set[str]:
    """Ids already answered in `path`; a last line cut short by a crash is dropped (and,
    with `repair`, cut from the file this process appends to)."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        path.write_bytes(complete)
    ids = set()
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            ids.add(str(json.loads(line)["id"]))
    return ids


def blank_pixels(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """Every patch value set to what a black pixel becomes at the encoder's input."""
    channels = len(mean)
    per_channel = torch.tensor([(0.0 - m) / s for m, s in zip(mean, std, strict=True)])
    out = pixel_values.clone().view(pixel_values.shape[0], channels, -1)
    out[:] = per_channel.to(out.dtype)[None, :, None]
    return out.view_as(pixel_values)


def _prepare(processor: OmniVMedProcessor, record: Record, blank_visual: bool) -> Prompt:
    """The prompt of one record, with its media read and pruned."""
    question = _question(record)
    visual = None
    if record.media:
        media = [Media(kind, path, options) for kind, path, options in record.media]
        visual = processor.encode_media(media, record.id)
        if blank_visual:
            o = processor.options
            visual.pixel_values = blank_pixels(visual.pixel_values, o.image_mean, o.image_std)
    prompt = build_prompt(processor, [{"role": "user", "content": question}], visual, record.id)
    counts = visual.token_counts if visual is not None else []
    processor.check_length(prompt.input_ids.numel(), sum(counts), record.id)
    return prompt


def _prepare_each(processor: OmniVMedProcessor, records: list[Record], blank_visual: bool,
                  on_error: str) -> tuple[list[Record], list[Prompt], list[dict[str, str]]]:  # fmt: skip
    """(records kept, their prompts, skipped {"id", "error"}): under `on_error="skip"` a
    record whose media or prompt is bad is left out, not fatal."""
    kept, prompts, skipped = [], [], []
    for record in records:
        try:
            prompts.append(_prepare(processor, record, blank_visual))
        except ValueError as exc:  # MediaError, ConversationError, a token limit
            if on_error != "skip":
                raise
            skipped.append({"id": record.id, "error": str(exc)})
            continue
        kept.append(record)
    return kept, prompts, skipped


def answer_records(model, processor: OmniVMedProcessor, records: list[Record], max_new_tokens: int,
                   blank_visual: bool = False,
                   on_error: str = "raise") -> tuple[list[dict[str, Any]], list[dict[str, str]]]:  # fmt: skip
    """(predictions, skipped records): greedy answers to several records decoded together
    (`inference.generate`), every record's media read and pruned once. Each answer equals
    the one the record gets alone (tested)."""
    records, prompts, skipped = _prepare_each(processor, records, blank_visual, on_error)
    if not records:
        return [], skipped
    start = time.perf_counter()
    rows = generate(model, processor.tokenizer, prompts, Sampling(max_new_tokens))
    seconds = (time.perf_counter() - start) / len(records)
    out = []
    for record, prompt, row in zip(records, prompts, rows, strict=True):
        visual = prompt.visual
        out.append({"id": record.id, "prediction": row.text.strip(),
                    "visual_tokens": sum(visual.token_counts) if visual else 0,
                    "visual_tokens_unpruned": sum(visual.unpruned_counts) if visual else 0,
                    "seconds": seconds})  # fmt: skip
    return out, skipped


@dataclass
class BenchmarkRun:
    predictions: Path  # the merged predictions file
    answered: int  # records answered by this process in this run
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"id", "error"}, this process


def run_benchmark(model_dir: str | Path, benchmark: str | Path, out_dir: str | Path, *,
                  data_root: str | Path | None = None, max_new_tokens: int = 32,
                  blank_visual: bool = False, device: str = "auto", limit: int | None = None,
                  batch_size: int = 8, progress: bool = True, on_error: str = "raise") -> BenchmarkRun:  # fmt: skip
    """Answer every record of `benchmark` (JSONL/JSON instruction records with their
    media) into a merged predictions file. `on_error="skip"`: a record whose media or
    prompt is bad is left out (counted, named in the log; scoring counts it as missing)
    instead of stopping the run; it is tried again when the run resumes."""
    from ..data.files import output_folder
    from ..inference import load_for_inference

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out_dir = output_folder(out_dir, "--out")
    rank, world = join_launched_group()
    records = load_records(benchmark, data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ScoringError(f"{benchmark}: duplicate id {dup!r}")
    if limit is not None:
        records = records[:limit]
    if device == "auto" and torch.cuda.is_available() and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    model, processor = load_for_inference(model_dir, device=device)
    options = processor.options
    settings = {"model": str(Path(model_dir).resolve()), "benchmark": str(Path(benchmark).resolve()),
                "max_new_tokens": max_new_tokens, "decoding": "greedy", "batch_size": batch_size, "blank_visual": blank_visual,
                "world_size": world, "media": json.loads(json.dumps(options.__dict__, default=str)),
                "prompt": "chat template of the model's tokenizer, one user turn holding the "
                          "record's first human turn, generation prompt added"}  # fmt: skip
    run_file = out_dir / RUN_FILE
    if rank == 0:
        if run_file.is_file():
            before = json.loads(run_file.read_text())
            changed = sorted(
                k for k in settings if k != "world_size" and before.get(k) != settings[k]
            )
            if changed:
                raise ScoringError(
                    f"{out_dir} holds a run with other settings ({changed}); use another --out"
                )
        run_file.write_text(json.dumps(settings, indent=2) + "\n")
    # Ids answered by any earlier run of this folder count as done, whatever its world size.
    # Every rank must read the same done ids (the shards are cut after them), so none
    # appends before all have read.
    barrier()
    part = out_dir / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.partial.jsonl")
    done = _done_ids(part)
    for other in _part_files(out_dir):
        if other != part:
            done |= _done_ids(other, repair=False)
    barrier()
    todo = [r for r in records if r.id not in done][rank::world]
    bar = tqdm(total=len(todo), desc=f"eval rank {rank}", disable=not progress or rank != 0)
    answered, skipped = 0, []
    # The bar is closed (its line ended) before an error propagates, so the error's line
    # starts a line of its own.
    with bar, part.open("a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            rows, left_out = answer_records(
                model, processor, chunk, max_new_tokens, blank_visual, on_error
            )
            answered, skipped = answered + len(rows), skipped + left_out
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    barrier()
    final = out_dir / "predictions.jsonl"
    if rank == 0:
        rows = {}
        for p in _part_files(out_dir):  # every shard of every run of this folder
            text = p.read_text(encoding="utf-8")
            for line in text[: text.rfind("\n") + 1].splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(str(row["id"]), row)
        tmp = final.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                if r.id in rows:
                    f.write(json.dumps(rows[r.id], ensure_ascii=False) + "\n")
        tmp.replace(final)
    barrier()
    return BenchmarkRun(final, answered, skipped)
