"""Training: overfitting a tiny set, two ranks on loopback, ZeRO-2/3, resume after SIGKILL,
and configs that fail before training starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from omnivmed.processing.processor import ProcessorOptions
from omnivmed.training import ConfigError, StageConfig, load_stage_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"max_pixels": 1024, "min_pixels": 1024}  # 32x32 frames: fast steps
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        records.append({"id": f"s{i}", "image": f"img{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                          {"from": "gpt", "value": f"picture number {i}"}]})  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def write_config(path: Path, data_file: Path, out_dir: Path, **extra) -> Path:
    import yaml

    cfg = {"name": "t", "data": str(data_file), "output_dir": str(out_dir), "init": "preset:tiny",
           "trainable": ["vision_tower", "connector", "language_model"], "lr": 3e-3, "epochs": 3,
           "micro_batch_size": 2, "media": {"max_pixels": 1024, "min_pixels": 1024}, "save_every": 1, **extra}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(
    args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None, **kw
):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # an in-process test may have set them
    cmd = (launcher or [sys.executable]) + ["-m", "omnivmed.cli.train", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def steps(out: Path) -> list[dict]:
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def samples(out: Path, rank: int = 0) -> list[list[str]]:
    by_step = {}
    for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["samples"]
    return [by_step[s] for s in sorted(by_step)]


def fingerprint(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"fingerprint_rank{rank}.json").read_text())


def test_one_process_overfits_a_tiny_set(tmp_path, tiny_data):
    from omnivmed.training import train_stage

    cfg = StageConfig(name="fit", data=str(tiny_data), output_dir=str(tmp_path / "out"), lr=3e-3, epochs=6,
                      trainable=["vision_tower", "connector", "language_model"], media=SMALL)  # fmt: skip
    final = train_stage(cfg)
    losses = [r["loss"] for r in steps(tmp_path / "out")]
    assert len(losses) == 24 and losses[-1] < 0.5 * losses[0]
    assert (final / "model.safetensors").exists() and (final / "tokenizer_config.json").exists()
    saved = ProcessorOptions.from_dir(final)  # inference reads media as this stage did
    assert saved == cfg.media
    assert (tmp_path / "out" / "tensorboard").is_dir()


def test_two_ranks_on_loopback_agree_and_see_disjoint_data(tmp_path, tiny_data):
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, out)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    proc = run_cli(["--config", str(cfg), "--no-resume"], launcher=launcher)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert fingerprint(out, 0) == fingerprint(out, 1)
    rank0, rank1 = samples(out, 0), samples(out, 1)
    assert len(rank0) == len(rank1) == 6  # 3 epochs of 8 samples / 2 ranks / 2 per batch
    for a, b in zip(rank0, rank1, strict=True):
        assert not set(a) & set(b)
    # within an epoch the two ranks cover the whole set
    assert set(rank0[0] + rank0[1] + rank1[0] + rank1[1]) == {f"s{i}" for i in range(8)}


@pytest.mark.parametrize(
    ("zero_stage", "offload"),
    [(2, False), (3, False), (2, True)],
    ids=["zero2", "zero3", "zero2-offload"],
)
def test_zero_stages_train_the_same_model(tmp_path, tiny_data, zero_stage, offload):
    proc = run_cli(
        [
            "--config",
            str(
                write_config(
                    tmp_path / "c.yaml",
                    tiny_data,
                    tmp_path / "z",
                    zero_stage=zero_stage,
                    offload=offload,
                )
            ),
        ]
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    losses = [r["loss"] for r in steps(tmp_path / "z")]
    assert losses[-1] < losses[0]
    reference = tmp_path.parent / "zero_reference.json"
    fp = fingerprint(tmp_path / "z")
    if reference.exists():  # ZeRO-2, ZeRO-3 and offload reach the same parameters (fp32)
        assert abs(fp["sum"] - json.loads(reference.read_text())["sum"]) < 1e-3 * max(
            1.0, abs(fp["sum"])
        )
    else:
        reference.write_text(json.dumps(fp))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_data):
    whole = tmp_path / "whole"
    # Two DataLoader workers prefetch: the kill lands with batches fetched but not trained on.
    proc = run_cli(
        ["--config", str(write_config(tmp_path / "a.yaml", tiny_data, whole, num_workers=2))]
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]

    broken = tmp_path / "broken"
    cfg = write_config(tmp_path / "b.yaml", tiny_data, broken, num_workers=2)
    proc = run_cli(["--config", str(cfg)])
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "step-3").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "training ended before it could be killed"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "final").exists()
    resumed = run_cli(["--config", str(cfg)])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    assert fingerprint(broken) == fingerprint(whole)
    assert samples(broken) == samples(whole)  # the same samples, each step once
    assert [r["step"] for r in steps(broken)] == list(range(1, 13))


@pytest.mark.parametrize(
    "problem,edit,message",
    [
        ("unknown key", {"learning_rate": 1e-3}, "unknown keys \\['learning_rate'\\]"),
        ("missing data", {"data": "/nonexistent/train.json"}, "does not exist"),
        ("bad module", {"trainable": ["vision"]}, "unknown modules"),
    ],
)
def test_malformed_config_fails_before_training(tmp_path, tiny_data, problem, edit, message):
    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "o", **edit)
    start = time.time()
    proc = run_cli(["--config", str(cfg)])
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and pytest.importorskip("re").search(message, log), log[-2000:]
    assert not (tmp_path / "o").exists() and time.time() - start < 60


def test_stage_order_and_chain_checks(tmp_path, tiny_data):
    from omnivmed.cli.train import main

    data_dir = tmp_path / "d"
    data_dir.mkdir()
    for n in (1, 3):
        (data_dir / f"stage{n}.json").write_text(tiny_data.read_text())
    assert (
        main(["--stages", "3,1", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o")])
        == 2
    )
    assert (
        main(["--stages", "1,2", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o")])
        == 2
    )
    with pytest.raises(ConfigError, match="starts from 'previous'"):
        from omnivmed.training import check_stage_order

        check_stage_order(
            [load_stage_config(ROOT / "python/omnivmed/configs/stage2.yaml", data=str(tiny_data))]
        )
    assert torch.__version__  # keeps the import used


def test_lora_trains_adapters_and_exports_a_merged_model(tmp_path, tiny_data):
    pytest.importorskip("peft")
    from omnivmed.models import OmniVMedForConditionalGeneration
    from omnivmed.training import train_stage

    cfg = StageConfig(name="lora", data=str(tiny_data), output_dir=str(tmp_path / "out"), lr=3e-3, epochs=3,
                      trainable=["connector", "language_model"], lora={"r": 4, "alpha": 8},
                      media=SMALL)  # fmt: skip
    final = train_stage(cfg)
    losses = [r["loss"] for r in steps(tmp_path / "out")]
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    keys = load_file(str(final / "model.safetensors")).keys()
    assert not any("lora_" in k for k in keys)  # merged on export
    model = OmniVMedForConditionalGeneration.from_pretrained(final)
    assert model.language_model.__class__.__name__ == "Qwen2ForCausalLM"


def test_accumulation_resume_and_fresh_start_in_process(tmp_path, tiny_data):
    from omnivmed.training import train_stage

    def cfg(out, **kw):
        return StageConfig(name="acc", data=str(tiny_data), output_dir=str(out), lr=3e-3, epochs=2, grad_accum=2,
                           save_every=1, trainable=["connector", "language_model"], media=SMALL,
                           **kw)  # fmt: skip

    train_stage(cfg(tmp_path / "whole"))
    assert [r["step"] for r in steps(tmp_path / "whole")] == [1, 2, 3, 4]  # 16 samples / 2 / 2
    assert all(len(s) == 4 for s in samples(tmp_path / "whole"))  # 2 micro-batches of 2 per step
    train_stage(cfg(tmp_path / "split"), stop_after_steps=1)
    train_stage(cfg(tmp_path / "split"))
    assert fingerprint(tmp_path / "split") == fingerprint(tmp_path / "whole")
    assert samples(tmp_path / "split") == samples(tmp_path / "whole")
    # resume=False starts over: old checkpoints and logs go first
    train_stage(cfg(tmp_path / "split", max_steps=1), resume=False)
    assert [r["step"] for r in steps(tmp_path / "split")] == [1]
    assert [p.name for p in (tmp_path / "split" / "checkpoints").glob("step-*")] == ["step-1"]


def test_dataloader_workers_and_packing_keep_resume_exact(tmp_path, tiny_data):
    from omnivmed.training import train_stage

    def cfg(out, **kw):
        return StageConfig(name="dl", data=str(tiny_data), output_dir=str(out), lr=3e-3, epochs=2,
                           save_every=1, trainable=["connector", "language_model"], media=SMALL,
                           **kw)  # fmt: skip

    train_stage(cfg(tmp_path / "whole", num_workers=0))
    train_stage(cfg(tmp_path / "split", num_workers=2), stop_after_steps=3)
    train_stage(cfg(tmp_path / "split", num_workers=2))
    assert fingerprint(tmp_path / "split") == fingerprint(tmp_path / "whole")
    assert samples(tmp_path / "split") == samples(tmp_path / "whole")
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in steps(tmp_path / "split"))
    # Padded rows train on the same samples to the same loss as packed ones.
    train_stage(cfg(tmp_path / "padded", packing=False, max_steps=2))
    padded, packed = steps(tmp_path / "padded"), steps(tmp_path / "whole")
    assert samples(tmp_path / "padded") == samples(tmp_path / "whole")[:2]
    assert padded[0]["loss"] == pytest.approx(packed[0]["loss"], rel=1e-4)


def test_cli_overrides_are_validated(tmp_path, tiny_data):
    from omnivmed.cli.train import main, plan_stages

    cfg = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "o")
    assert main(["--config", str(cfg), "--set", "zero_stage=7"]) == 2
    assert main(["--config", str(cfg), "--set", "lr"]) == 2
    assert main(["--config", str(cfg), "--set", "grad_accum=0"]) == 2
    assert main(["--config", str(cfg), str(cfg)]) == 2  # two stages, one output dir
    import argparse

    args = argparse.Namespace(
        config=[str(cfg)], data=None, output_dir=None, set=["lr=1e-3", "max_steps=50"]
    )
    (stage,) = plan_stages(args)
    assert stage.lr == 0.001 and stage.max_steps == 50
    with pytest.raises(ConfigError, match="lr must be float"):
        StageConfig(name="x", lr="fast")


def test_deepspeed_launcher_runs_two_ranks(tmp_path, tiny_data):
    bin_dir = Path(sys.executable).parent
    launcher, script = bin_dir / "deepspeed", bin_dir / "omnivmed-train"
    if not (launcher.exists() and script.exists()):
        pytest.skip("needs the installed omnivmed-train console script and the deepspeed launcher")
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, out, epochs=2, save_every=0)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    proc = subprocess.run(
        [str(launcher), "--num_accelerators", "2", "--master_port", "29541", str(script), "--config", str(cfg)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert fingerprint(out, 0) == fingerprint(out, 1)
    for a, b in zip(samples(out, 0), samples(out, 1), strict=True):
        assert not set(a) & set(b)


def test_two_nodes_from_a_hostfile(tmp_path, tiny_data):
    """Two nodes of one rank each, as a DeepSpeed hostfile describes them, started the way a
    cluster without ssh between nodes starts them: the launcher once per node with
    --no_ssh --node_rank. Here both "nodes" are this machine on loopback; every rank has
    LOCAL_RANK 0, so anything keyed on the local rank instead of the global one shows up
    as clashing files or duplicated data."""
    out = tmp_path / "nodes"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, out, epochs=2, save_every=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONUNBUFFERED"] = "1"

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
               "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
               "--master_port", "29547", "--module", "omnivmed.cli.train", "--config", str(cfg),
               "--no-resume"]  # fmt: skip
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    procs = [node(0), node(1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for node, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"node {node}:\n{log[-3000:]}"
    assert fingerprint(out, 0) == fingerprint(out, 1)
    rank0, rank1 = samples(out, 0), samples(out, 1)
    assert len(rank0) == len(rank1) == 4  # 2 epochs of 8 samples / 2 ranks / 2 per batch
    for a, b in zip(rank0, rank1, strict=True):
        assert not set(a) & set(b)
    # Checkpoints are shared: one folder per step with both ranks' RNG state in it.
    checkpoints = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert all((p / "manifest.json").is_file() for p in checkpoints)
    assert checkpoints, "no checkpoint written"
    assert {f.name for f in checkpoints[-1].glob("rng_rank*")} == {
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    }


def _stage(tiny_data, out: Path, **kw) -> StageConfig:
    return StageConfig(**{"name": "h", "data": str(tiny_data), "output_dir": str(out), "lr": 1e-3,
                          "max_steps": 2, "save_every": 1, "trainable": ["connector"],
                          "media": SMALL, **kw})  # fmt: skip


def test_checkpoints_hold_no_pickles_of_ours_and_are_verified_before_resume(tmp_path, tiny_data):
    import shutil

    from omnivmed.training import train_stage
    from omnivmed.training.checkpoint import CheckpointError, OutputLock

    out = tmp_path / "a"
    train_stage(_stage(tiny_data, out))
    ckpts = out / "checkpoints"
    step2 = ckpts / "step-2"
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert "rng_rank0.safetensors" in manifest["files"] and not list(step2.glob("rng_*.pt"))
    assert manifest["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    # A folder named like a checkpoint is not one without its manifest: it is ignored.
    (ckpts / "step-9").mkdir()
    (ckpts / "step-9" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")

    # Resuming with other settings is an error listing them, unless they are allowed.
    with pytest.raises(
        ConfigError, match=r"lr: 0\.001 in the checkpoint, 0\.002 now.*--allow-changed"
    ):
        train_stage(_stage(tiny_data, out, lr=2e-3, max_steps=3))
    train_stage(_stage(tiny_data, out, lr=2e-3, max_steps=3), allow_changed=["lr", "max_steps"])
    assert (ckpts / "step-3" / "manifest.json").is_file()

    # A changed file is refused before DeepSpeed reads anything.
    victim = next(p for p in sorted((ckpts / "step-3").rglob("*.pt")))
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=rf"{victim.name}: size or SHA-256 differs"):
        train_stage(_stage(tiny_data, out, lr=2e-3, max_steps=4), allow_changed=["lr", "max_steps"])

    # Checkpoints copied from another run are never loaded.
    other = tmp_path / "b"
    train_stage(_stage(tiny_data, other, max_steps=1))
    shutil.rmtree(other / "checkpoints")
    shutil.copytree(out / "checkpoints", other / "checkpoints")
    shutil.rmtree(other / "checkpoints" / "step-3")
    with pytest.raises(CheckpointError, match="not by the run that owns this output folder"):
        train_stage(_stage(tiny_data, other, max_steps=3))

    # A second run on a folder in use stops at once.
    with OutputLock(other), pytest.raises(CheckpointError, match="is in use by another run"):
        train_stage(_stage(tiny_data, other, max_steps=3))


def test_non_finite_loss_stops_training_and_nothing_is_exported(tmp_path, tiny_data):
    from omnivmed.training import train_stage

    out = tmp_path / "nan"
    cfg = _stage(tiny_data, out, lr=1e6, max_steps=8, warmup_ratio=0.0, max_grad_norm=0.0,
                 trainable=["vision_tower", "connector", "language_model"])  # fmt: skip
    with pytest.raises(FloatingPointError, match="is not finite at step"):
        train_stage(cfg)
    assert not (out / "final").exists()
    assert not list(out.glob("final.tmp-*"))
