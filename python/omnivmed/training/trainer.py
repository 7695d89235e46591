"""Training one stage with DeepSpeed: freezing, per-module learning rates, a cosine
schedule with warm-up, gradient accumulation, atomic checkpoints with exact resume, and
metrics (tqdm, JSONL, TensorBoard)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import InstructionDataset, VisualCollator, load_mixture, load_records
from ..distributed import all_ranks_agree, barrier, init_distributed
from ..models import build_preset
from ..processing.processor import OmniVMedProcessor, ProcessorOptions
from ..run_folder import RUN_FILE
from .checkpoint import (
    CheckpointError,
    OutputLock,
    load_latest,
    run_id,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, StageConfig, check_data
from .sampler import ResumableBatchSampler, ResumableShardedSampler

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_initial_model(cfg: StageConfig):
    from transformers import AutoTokenizer

    if cfg.init.startswith("preset:"):
        return build_preset(cfg.init.split(":", 1)[1], **cfg.model)
    from ..models.loading import load_saved_model

    path = Path(cfg.init)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"stage {cfg.name!r}: init {cfg.init!r} is neither 'preset:<name>' nor a saved model directory"
        )
    check_encoder_input(cfg, ProcessorOptions.from_dir(path))
    return load_saved_model(path), AutoTokenizer.from_pretrained(path)


# How pixels reach the vision encoder: a model's weights were trained for one such rule (an
# imported model for its release's), so a stage that continues from a saved model must name
# the same, never fall back to the defaults silently.
ENCODER_INPUT_SETTINGS = ("resize", "image_mean", "image_std")


def check_encoder_input(cfg: StageConfig, saved: ProcessorOptions) -> None:
    """Refuse a stage whose media settings feed the encoder otherwise than the saved model
    it starts from was trained with (`ENCODER_INPUT_SETTINGS`)."""
    changed = [k for k in ENCODER_INPUT_SETTINGS if getattr(cfg.media, k) != getattr(saved, k)]
    if changed:
        found = ", ".join(
            f"{k}: {getattr(saved, k)!r} there, {getattr(cfg.media, k)!r} here" for k in changed
        )
        raise ConfigError(
            f"stage {cfg.name!r}: init {cfg.init!r} was saved with other encoder input "
            f"({found}); set them under `media:` as the model folder's processor_config.json has them"
        )


def start_fresh(out_dir: Path, rank: int) -> None:
    """A run that must not resume removes the previous run's checkpoints and logs first."""
    if rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        for pattern in ("metrics.jsonl", "samples_rank*.jsonl", "fingerprint_rank*.json", RUN_FILE):
            for f in out_dir.glob(pattern):
                f.unlink()
    barrier()


def apply_lora(model, cfg: StageConfig) -> None:
    """Wrap the LLM with LoRA adapters (peft); its base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    spec = cfg.lora or {}
    lora = LoraConfig(
        r=int(spec.get("r", 16)),
        lora_alpha=int(spec.get("alpha", 32)),
        lora_dropout=float(spec.get("dropout", 0.0)),
        target_modules=spec.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, lora)


def merge_lora(model) -> None:
    """Fold the adapters into the LLM's weights, so the export is a plain model."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()


def param_groups(model, cfg: StageConfig) -> list[dict[str, Any]]:
    groups = []
    for name, module in model.named_children():
        trainable = name in cfg.trainable
        for pname, p in module.named_parameters():
            # With LoRA, the LLM trains through its adapters only.
            lora_llm = name == "language_model" and cfg.lora is not None
            p.requires_grad_(trainable and (not lora_llm or "lora_" in pname))
        if not trainable:
            continue
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.module_lr.get(name, cfg.lr), "name": name,
                           "weight_decay": cfg.weight_decay})  # fmt: skip
    if not groups:
        raise ConfigError(f"stage {cfg.name!r}: nothing to train (trainable = {cfg.trainable})")
    return groups


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(groups: list[dict[str, Any]], cfg: StageConfig) -> torch.optim.Optimizer:
    """AdamW. With the optimizer offloaded to the CPU on a GPU machine, DeepSpeed's
    vectorised CPU Adam (built once by DeepSpeed, then cached); otherwise torch's, so
    nothing is compiled at start."""
    if cfg.offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def deepspeed_config(cfg: StageConfig) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and torch.cuda.is_bf16_supported()},
        "zero_allow_untested_optimizer": True,
        # Offload without a GPU (tests, CPU runs) keeps torch's AdamW (build_optimizer).
        "zero_force_ds_cpu_optimizer": on_gpu,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_dataset(cfg: StageConfig, processor: OmniVMedProcessor):
    check_data(cfg)
    if cfg.data.endswith((".yaml", ".yml")):
        return load_mixture(cfg.data, processor, on_error=cfg.on_error)
    return InstructionDataset(
        load_records(cfg.data, cfg.data_root, cfg.on_error),
        processor,
        on_error=cfg.on_error,
    )


def loader_workers(setting: int | None) -> int:
    """The DataLoader's worker count: the stage's `num_workers`, or its default (None): none
    on the CPU, where workers would take cores from the step itself; with GPUs, the cores
    per GPU less one for the training process, at most 8."""
    if setting is not None:
        return setting
    if not torch.cuda.is_available():
        return 0
    per_gpu = (os.cpu_count() or 2) // max(1, torch.cuda.device_count())
    return max(1, min(8, per_gpu - 1))


@contextlib.contextmanager
def cores_shared_with(workers: int) -> Iterator[None]:
    """While `workers` loader processes run, the training process keeps only the cores they
    leave it (of its share of the node's): oversubscribed, each of its parallel ops waits
    for a descheduled thread (on 2 cores the step ran 3x slower)."""
    threads = torch.get_num_threads()
    if workers > 0:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = len(os.sched_getaffinity(0)) // max(1, ranks)
        torch.set_num_threads(max(1, min(threads, cores - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_loader(dataset, sampler: ResumableShardedSampler, cfg: StageConfig, pad_token_id: int,
                 workers: int, pin_memory: bool) -> DataLoader:  # fmt: skip
    """Batches read, decoded, pruned, tokenized and collated by `workers` worker processes
    ahead of the step (kept alive across epochs), in the sampler's order."""
    if workers > 0:
        # The tokenizer was used before the workers fork; its thread pool must not be.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(sampler, cfg.micro_batch_size),
        collate_fn=VisualCollator(pad_token_id, packing=cfg.packing, padding_side="right"),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def batch_tokens(batch: dict[str, Any], image_token_id: int) -> dict[str, int]:
    """What a collated batch holds: LLM tokens (padding left out), the visual tokens among
    them, and the patches the vision tower encodes."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return {
        "tokens": int(mask.sum()) if mask is not None else ids.numel(),
        "visual_tokens": int((ids == image_token_id).sum()),
        "tower_tokens": int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0,
    }


def timed(batches: Iterable[Any]) -> Iterator[tuple[float, Any]]:
    """Each item with the seconds spent waiting for it."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - start, item


class MetricsLog:
    """metrics.jsonl and TensorBoard, both opened at the first record, so a run that fails
    before its first step leaves no log files (and its folder can be removed)."""

    def __init__(self, out_dir: Path, stage: str, enabled: bool) -> None:
        self.enabled = enabled
        self.stage = stage
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:
            logger.warning("tensorboard is not installed: metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        record = {"stage": self.stage, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{self.stage}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Settings that change neither the model nor the data a resumed run sees.
_RESUME_FREE = ("name", "output_dir", "save_every", "keep_last", "checkpoint_at_end", "num_workers")


def resume_settings(cfg: StageConfig) -> dict[str, Any]:
    """The settings a checkpoint records, which a resume must match."""
    values = dataclasses.asdict(cfg)
    return {k: v for k, v in values.items() if k not in _RESUME_FREE}


def check_resume_settings(
    saved: dict[str, Any] | None, cfg: StageConfig, where: Path, allow_changed: Collection[str]
) -> None:
    if saved is None:
        raise CheckpointError(f"{where}: the checkpoint does not record its settings")
    now = resume_settings(cfg)
    changed = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in allow_changed
    )
    if changed:
        listing = "; ".join(
            f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in changed
        )
        raise ConfigError(
            f"stage {cfg.name!r}: resuming from {where} with changed settings ({listing}); "
            f"restore them, start fresh, or allow them with --allow-changed {','.join(changed)}"
        )


@contextlib.contextmanager
def _locked_output(out_dir: Path, rank: int):
    """Rank 0 holds an exclusive lock on the output folder; every rank learns whether it
    could take it, so all stop together when another run holds it."""
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(OutputLock(out_dir))
            except CheckpointError as exc:
                error = exc
        if not all_ranks_agree(error is None):
            raise error or CheckpointError(
                f"{out_dir} is in use by another run (rank 0 could not lock it)"
            )
        yield


def train_stage(
    cfg: StageConfig,
    *,
    resume: bool = True,
    stop_after_steps: int | None = None,
    allow_changed: Collection[str] = (),
) -> Path:
    """Train one stage; returns the exported model directory (`<output_dir>/final`).

    `resume`: continue from the newest complete checkpoint in `<output_dir>/checkpoints`
    (its files checked against its manifest, its settings against `cfg`: a difference is
    an error unless its key is in `allow_changed`).
    `stop_after_steps`: return early after that many optimizer steps of this run (for
    tests and time-boxed jobs; the last checkpoint stays usable)."""
    rank, world = init_distributed()
    with _locked_output(Path(cfg.output_dir), rank):
        return _train_stage(cfg, resume, stop_after_steps, allow_changed, rank, world)


def _train_stage(cfg, resume, stop_after_steps, allow_changed, rank, world) -> Path:
    import deepspeed

    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    model, tokenizer = load_initial_model(cfg)
    # The one processor of the stage: it reads the data and is saved with the model.
    processor = OmniVMedProcessor(model.config, tokenizer, cfg.media)
    dataset = build_dataset(cfg, processor)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        apply_lora(model, cfg)
    groups = param_groups(model, cfg)
    sampler = ResumableShardedSampler(len(dataset), rank, world, cfg.seed)
    micro_per_epoch = sampler.per_rank // cfg.micro_batch_size
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"stage {cfg.name!r}: {len(dataset)} samples make no optimizer step with "
                          f"{world} ranks x micro batch {cfg.micro_batch_size} x accumulation {cfg.grad_accum}")  # fmt: skip
    # max_steps, when given, is the length of the stage (epochs then only seed the data order).
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(groups, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.warmup_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg))  # fmt: skip
    pin = engine.device.type == "cuda"
    workers = loader_workers(cfg.num_workers)
    loader = build_loader(dataset, sampler, cfg, tokenizer.pad_token_id, workers, pin)
    step, seen_samples = 0, []
    ckpt_root = out_dir / "checkpoints"
    if not resume:
        start_fresh(out_dir, rank)
    if rank == 0:
        run_id(out_dir, create=True)
    barrier()
    run = run_id(out_dir, create=False)
    if resume:
        client = load_latest(engine, ckpt_root, run, rank)
        if client is not None:
            if client.get("stage") != cfg.name:
                raise ConfigError(f"{ckpt_root} holds checkpoints of stage {client.get('stage')!r}, not "
                                  f"{cfg.name!r}; give each stage its own output_dir")  # fmt: skip
            check_resume_settings(client.get("settings"), cfg, ckpt_root, allow_changed)
            step = client["step"]
            sampler.load_state_dict(client["sampler"])
            set_rng_state(client["rng"])
            if rank == 0:
                logger.info("resumed stage %s at step %d", cfg.name, step)
    metrics = MetricsLog(out_dir, cfg.name, rank == 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_log = out_dir / f"samples_rank{rank}.jsonl"
    # Closed (its line ended) before an error propagates, so the error starts a line.
    with (
        cores_shared_with(workers),
        tqdm(
            total=total_steps,
            initial=step,
            desc=f"{cfg.name}",
            disable=rank != 0,
            dynamic_ncols=True,
        ) as bar,
    ):
        run_steps, window_loss, window_skipped, t0 = 0, [], 0, time.perf_counter()
        window_wait, window = 0.0, Counter()
        image_token_id = model.config.image_token_id
        engine.train()
        done = step >= total_steps
        while not done:
            for wait, batch in timed(loader):
                window_wait += wait
                sampler.advance(cfg.micro_batch_size)  # consumed: a checkpoint now counts it
                window_skipped += batch.pop("num_skipped")
                kept_ids = batch.pop("ids")
                if not all_ranks_agree("input_ids" in batch):
                    # Every rank skips this micro-batch together, so they stay in lockstep; what
                    # this rank held is counted as skipped, never dropped silently.
                    window_skipped += len(kept_ids)
                    continue
                seen_samples.extend(kept_ids)
                window.update(batch_tokens(batch, image_token_id))
                batch = {
                    k: v.to(engine.device, non_blocking=pin) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                loss = engine(**batch, use_cache=False).loss
                if not all_ranks_agree(bool(torch.isfinite(loss.detach()))):
                    raise FloatingPointError(
                        f"stage {cfg.name!r}: the loss is not finite at step {step + 1} (samples "
                        f"{kept_ids} on rank {rank}, or on another rank); stopping before the update. "
                        f"Lower lr (now {cfg.lr:g}) or check those samples; the last checkpoint is intact"
                    )
                engine.backward(loss)
                # Asked before step(): DeepSpeed advances its micro-step counter inside step().
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                window_loss.append(float(loss.detach()))
                if not boundary:
                    continue
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise FloatingPointError(
                        f"stage {cfg.name!r}: the gradient norm is {float(grad_norm)} at step "
                        f"{step + 1}; stopping, nothing exported (the last checkpoint is intact)"
                    )
                step += 1
                run_steps += 1
                # The samples behind this optimizer step, per rank: resumes append, and the last
                # record of each step is what the model saw.
                with samples_log.open("a") as f:
                    f.write(json.dumps({"step": step, "samples": seen_samples}) + "\n")
                seen_samples = []
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": float(np.mean(window_loss)), "lr": schedule.get_last_lr()[0],
                          "tokens_per_s": window["tokens"] * world / max(elapsed, 1e-9), "skipped": window_skipped,
                          "visual_tokens_per_s": window["visual_tokens"] * world / max(elapsed, 1e-9),
                          "tower_tokens_per_s": window["tower_tokens"] * world / max(elapsed, 1e-9),
                          "step_seconds": elapsed, "data_wait_fraction": window_wait / max(elapsed, 1e-9)}  # fmt: skip
                metrics.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                bar.update(1)
                window_loss, window_skipped, t0 = [], 0, time.perf_counter()
                window_wait, window = 0.0, Counter()
                if (cfg.save_every and step % cfg.save_every == 0) or (
                    step == total_steps and cfg.checkpoint_at_end
                ):
                    save_checkpoint(engine, ckpt_root, step,
                                    {"step": step, "stage": cfg.name, "sampler": sampler.state_dict(),
                                     "settings": resume_settings(cfg)},
                                    cfg.keep_last, rank, run)  # fmt: skip
                if step >= total_steps or (
                    stop_after_steps is not None and run_steps >= stop_after_steps
                ):
                    done = True
                    break
            else:
                sampler.next_epoch()
    metrics.close()
    final = out_dir / "final"
    write_fingerprint(engine, out_dir / f"fingerprint_rank{rank}.json", cfg.zero_stage, step)
    if step >= total_steps:
        export(engine, processor, final, cfg.zero_stage, rank)
    barrier()
    return final


def write_fingerprint(engine, path: Path, zero_stage: int, step: int) -> None:
    """Every rank's view of the full parameters, reduced to a checksum: ranks that trained
    in lockstep write identical files."""
    import hashlib

    import deepspeed

    model = engine.module
    params = list(model.parameters()) if zero_stage == 3 else []
    digest = hashlib.sha256()
    total = 0.0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        for name, p in sorted(model.named_parameters()):
            data = p.detach().float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(data.numpy().tobytes())
            total += float(data.double().sum())
    path.write_text(json.dumps({"step": step, "sha256": digest.hexdigest(), "sum": total}))


def export(engine, processor: OmniVMedProcessor, path: Path, zero_stage: int, rank: int) -> None:
    """save_pretrained (safetensors) of the whole model, gathered under ZeRO-3, with its
    processor (tokenizer and processor_config.json): written to a temporary folder, then
    renamed, so a kill leaves either the previous export or the whole new one. Non-finite
    weights are never exported."""
    import deepspeed

    model = engine.module
    params = list(model.parameters()) if zero_stage == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        # Every rank checks (the weights are the same everywhere), so all stop together.
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"not exporting {path}: non-finite weights in {bad[:6]}"
                f"{' and more' if len(bad) > 6 else ''}"
            )
        if rank == 0:
            merge_lora(model)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
