"""The dataset tools against hostile or careless inputs: links that lead out of the data
root, named pipes, oversized CSV fields, test records in a training mixture, outputs
pointed at the wrong place. Each gets a one-line error (exit 2) that names the file, or is
counted and named; none hangs, copies a file from elsewhere or succeeds on nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_clips import endovis_tree
from test_converters import image, read_jsonl, slake_tree, vqa_rad_tree, write_csv

from omnivmed.cli.data import main
from omnivmed.data.records import RecordError, load_records
from omnivmed.prep.captions.pipeline import load_clips
from omnivmed.prep.converters import convert_dataset

SECRET = "root:x:0:0:secret"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every data root of a test, which no tool may read."""
    path = tmp_path / "elsewhere" / "passwd.png"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.fixture
def no_hang():
    """Turns a read that blocks forever into a test failure instead of a stuck suite."""

    def fail(*_):
        raise TimeoutError("blocked reading a named pipe")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_line_error(capsys) -> str:
    """The error line (after any progress bar's lines)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1].split("\r")[-1]
    assert last.startswith("omnivmed-data: "), err
    return last


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# ---- links leading out of the data root ------------------------------------------------------
def test_clips_refuse_a_frame_linked_outside_the_data_root(tmp_path, secret, capsys):
    root = endovis_tree(tmp_path / "endovis", {1: 6})
    convert_dataset("endovis18-vqa", root, tmp_path / "e.jsonl")
    # A neighbour of an annotated frame (not annotated itself) is a link to a private file.
    linked = root / "seq_1" / "left_frames" / "frame003.png"
    linked.unlink()
    linked.symlink_to(secret)
    out = tmp_path / "clips"
    argv = ["clips", str(tmp_path / "e.jsonl"), "--data-root", str(root), "--out", str(out),
            "--window", "3"]  # fmt: skip
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "seq_1/left_frames/frame003.png is a link that points outside the data root" in err
    assert not any(SECRET in p.read_text(errors="ignore") for p in files_under(out))


def test_validate_refuses_a_frame_folder_holding_a_link_out(tmp_path, secret, capsys):
    root = tmp_path / "data"
    for i in range(2):
        image(root / "clip" / f"{i:03d}.png", i)
    (root / "clip" / "002.png").symlink_to(secret)
    row = {"id": "v", "videos": ["clip"], "conversations": [{"from": "human", "value": "<video>"}]}
    (root / "d.jsonl").write_text(json.dumps(row) + "\n")
    assert main(["validate", str(root / "d.jsonl"), "--no-read"]) == 1
    out = capsys.readouterr().out
    assert "002.png is a link that points outside the data root" in out and "OK" not in out


def test_records_name_a_medium_linked_outside_the_data_root(tmp_path, secret):
    root = tmp_path / "data"
    root.mkdir()
    (root / "scan.png").symlink_to(secret)
    row = {
        "id": "a",
        "images": ["scan.png"],
        "conversations": [{"from": "human", "value": "<image>"}],
    }
    (root / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"scan\.png is a link that points outside the data root"):
        load_records(root / "d.jsonl")


def test_captions_refuse_clip_frames_linked_outside_the_root(tmp_path, secret):
    root = tmp_path / "clips"
    image(root / "c1" / "000.png")
    (root / "c1" / "001.png").symlink_to(secret)
    (root / "clips.jsonl").write_text(json.dumps({"id": "c1", "video": "c1"}) + "\n")
    with pytest.raises(ValueError, match=r"clip 'c1': .*001\.png is a link that points outside"):
        load_clips(root / "clips.jsonl", root)


def test_converters_refuse_release_files_linked_outside_the_release(tmp_path, secret, capsys):
    # A question file that is a link out of the release: the conversion stops and names it.
    root = slake_tree(tmp_path / "slake")
    (root / "test.json").unlink()
    (root / "test.json").symlink_to(secret)
    assert main(["convert", "slake", "--input", str(root), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "test.json is a link that points outside the data root" in one_line_error(capsys)
    # A report that is a link out of the release: counted and named, never copied.
    m3d = tmp_path / "m3d"
    (m3d / "v").mkdir(parents=True)
    np.save(m3d / "v" / "a.npy", np.zeros((1, 2, 4, 4), np.float32))
    (m3d / "v" / "a.txt").write_text("Normal.")
    (m3d / "v" / "b.txt").symlink_to(secret)
    table = {"train": [{"image": "v/a.npy", "text": "v/a.txt"}, {"image": "v/a.npy", "text": "v/b.txt"}],
             "validation": [], "test": []}  # fmt: skip
    (m3d / "M3D_Cap.json").write_text(json.dumps(table))
    assert (
        main(["convert", "m3d-cap", "--input", str(m3d), "--out", str(tmp_path / "c.jsonl")]) == 0
    )
    out = capsys.readouterr().out
    assert "v/b.txt is a link that points outside the data root" in out
    assert SECRET not in (tmp_path / "c.jsonl").read_text()


# ---- named pipes -----------------------------------------------------------------------------
def test_convert_refuses_a_named_pipe_instead_of_blocking(tmp_path, no_hang, capsys):
    root = slake_tree(tmp_path / "slake")
    (root / "validate.json").unlink()
    os.mkfifo(root / "validate.json")
    assert main(["convert", "slake", "--input", str(root), "--out", str(tmp_path / "s.jsonl")]) == 2
    err = one_line_error(capsys)
    assert "validate.json" in err and "named pipe" in err


# ---- CSV fields ------------------------------------------------------------------------------
def m3d_vqa_tree(root: Path, text: str) -> Path:
    (root / "vol").mkdir(parents=True)
    for split in ("train", "val", "test"):
        np.save(root / "vol" / f"{split}.npy", np.zeros((1, 2, 4, 4), np.float32))
        write_csv(root / f"M3D_VQA_{split}.csv", [{
            "Image Path": f"vol/{split}.npy", "Text": text if split == "train" else "r", "Question Type": "3",
            "Question": "Which organ?", "Choice A": "liver", "Choice B": "lung", "Choice C": "kidney",
            "Choice D": "heart", "Answer": "liver", "Answer Choice": "A"}])  # fmt: skip
    return root


def test_long_csv_fields_are_read_and_oversized_ones_named(tmp_path, monkeypatch, capsys):
    from omnivmed.prep.converters import CSV_FIELD_LIMIT

    default_limit = csv.field_size_limit()
    # A report longer than csv's own 128 KiB limit is an ordinary field.
    root = m3d_vqa_tree(tmp_path / "m3d", "x" * (200 << 10))
    assert (
        main(["convert", "m3d-vqa", "--input", str(root), "--out", str(tmp_path / "a.jsonl")]) == 0
    )
    assert csv.field_size_limit() == default_limit  # the process-wide limit is left as it was
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 6
    # Beyond the bound: one line naming the file and line.
    monkeypatch.setattr("omnivmed.prep.converters.CSV_FIELD_LIMIT", 1000)
    capsys.readouterr()
    assert (
        main(["convert", "m3d-vqa", "--input", str(root), "--out", str(tmp_path / "b.jsonl")]) == 2
    )
    err = one_line_error(capsys)
    assert "M3D_VQA_train.csv, line 2" in err and "1000 characters" in err
    assert CSV_FIELD_LIMIT >= 1 << 20


# ---- outputs ---------------------------------------------------------------------------------
def test_convert_writes_through_a_unique_temporary_file(tmp_path, capsys):
    root = vqa_rad_tree(tmp_path / "rad")
    out = tmp_path / "data" / "rad.jsonl"
    out.parent.mkdir()
    bystander = out.with_suffix(".jsonl.tmp")  # someone else's file beside the target
    bystander.write_text("keep me")
    assert main(["convert", "vqa-rad", "--input", str(root), "--out", str(out)]) == 0
    assert bystander.read_text() == "keep me"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "rad.jsonl",
        "rad.jsonl.tmp",
        "rad.summary.json",
    ]
    # A folder as --out: one line, nothing created beside it.
    capsys.readouterr()
    assert main(["convert", "vqa-rad", "--input", str(root), "--out", str(out.parent)]) == 2
    assert "is a folder" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "rad"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    from omnivmed.data.files import atomic_write

    target = tmp_path / "out.jsonl"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("command", ["mix", "clips", "tokens"])
def test_output_folders_that_are_files_are_refused(tmp_path, command, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main([command, str(data), "--out", str(taken)]) == 2
    assert "taken is an existing file; expected a folder" in one_line_error(capsys)
    assert taken.read_text() == "a file"


# ---- naming what was skipped ---------------------------------------------------------------
def test_convert_names_the_entries_it_skips(tmp_path, secret, capsys):
    root = vqa_rad_tree(tmp_path / "rad")  # qid 4 names missing.jpg
    rows = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    (root / "VQA_RAD Image Folder" / "linked.jpg").symlink_to(secret)
    rows += [{**rows[0], "qid": 10 + i, "image_name": f"gone{i}.jpg"} for i in range(3)]
    rows.append({**rows[0], "qid": 20, "image_name": "linked.jpg"})
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    assert (
        main(["convert", "vqa-rad", "--input", str(root), "--out", str(tmp_path / "r.jsonl")]) == 0
    )
    out = capsys.readouterr().out
    skipped = next(x for x in out.splitlines() if "skipped 5 entries" in x)
    assert "missing.jpg is missing" in skipped and "gone0.jpg is missing" in skipped
    assert skipped.endswith("and 2 more")  # kept short
    # A path escape is named on its own line, however many other problems come first.
    refused = next(x for x in out.splitlines() if "refused 1 files unread" in x)
    assert "linked.jpg is a link that points outside the data root" in refused
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert summary["refused_files"] == 1
    assert len(next(iter(summary["problem_examples"].values()))) == 3


# ---- training mixtures take the training split -----------------------------------------------
def test_mix_takes_the_training_split_unless_told_otherwise(tmp_path, capsys):
    convert_dataset("slake", slake_tree(tmp_path / "slake"), tmp_path / "slake.jsonl")
    spec = {"seed": 0, "datasets": [{"path": "slake.jsonl", "root": "slake", "ratio": 1.0}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    assert main(["mix", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    assert "splits: train only; left out 1 test, 1 validate records" in out
    rows = read_jsonl(tmp_path / "train" / "mixture.jsonl")
    assert {r["split"] for r in rows} == {"train"} and len(rows) == 2
    summary = json.loads((tmp_path / "train" / "mixture.summary.json").read_text())
    assert summary["splits"] == ["train"]
    assert summary["left_out_by_split"] == {"test": 1, "validate": 1}
    argv = [
        "mix",
        str(tmp_path / "mix.yaml"),
        "--out",
        str(tmp_path / "tv"),
        "--splits",
        "train,validate",
    ]
    assert main(argv) == 0
    assert {r["split"] for r in read_jsonl(tmp_path / "tv" / "mixture.jsonl")} == {
        "train",
        "validate",
    }
    # A split no file holds: refused, naming what the file does hold.
    capsys.readouterr()
    argv = ["mix", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "x"), "--splits", "training"]
    assert main(argv) == 2
    assert "no records of splits ['training']" in one_line_error(capsys)


def test_training_mixtures_draw_from_the_training_split_unless_told_otherwise(tmp_path):
    from omnivmed.data import load_mixture
    from omnivmed.data.mixture import MixtureError

    convert_dataset("slake", slake_tree(tmp_path / "slake"), tmp_path / "slake.jsonl")
    spec = {"seed": 0, "datasets": [{"path": "slake.jsonl", "root": "slake", "ratio": 1.0}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    mixture = load_mixture(tmp_path / "mix.yaml", processor=None)
    assert {r.meta["split"] for part in mixture.parts for r in part.records} == {"train"}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({**spec, "splits": ["train", "test"]}))
    mixture = load_mixture(tmp_path / "mix.yaml", processor=None)
    assert {r.meta["split"] for part in mixture.parts for r in part.records} == {"train", "test"}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({**spec, "splits": ["training"]}))
    with pytest.raises(MixtureError, match=r"no records of splits \['training'\]"):
        load_mixture(tmp_path / "mix.yaml", processor=None)
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({**spec, "splits": "train"}))
    with pytest.raises(MixtureError, match="'splits' must be a non-empty list"):
        load_mixture(tmp_path / "mix.yaml", processor=None)


# ---- the data root a converted file is read with ---------------------------------------------
def test_converted_files_read_with_their_release_as_data_root(tmp_path, capsys):
    from omnivmed.data.records import default_data_root

    root = vqa_rad_tree(tmp_path / "rad")
    out = tmp_path / "data" / "rad.jsonl"  # not beside the release
    convert_dataset("vqa-rad", root, out)
    assert default_data_root(out) == root.resolve()
    assert all(p.is_file() for r in load_records(out) for _, p, _ in r.media)
    argv = ["tokens", str(out), "--preset", "tiny", "--out", str(tmp_path / "t"),
            "--set", "media.max_pixels=4096"]  # fmt: skip
    assert main(argv) == 0
    assert "could not be read" not in capsys.readouterr().out
    # An explicit --data-root wins; where nothing can be read, the reason is given, exit 2.
    assert main([*argv, "--data-root", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "none of the 3 samples could be read" in err and "file not found" in err


def test_a_recorded_data_root_that_is_gone_is_named(tmp_path):
    root = vqa_rad_tree(tmp_path / "rad")
    out = tmp_path / "data" / "rad.jsonl"
    convert_dataset("vqa-rad", root, out)
    root.rename(tmp_path / "moved")
    with pytest.raises(
        RecordError, match=r"its data root .*rad \(recorded in .*rad\.summary\.json\)"
    ):
        load_records(out)
    assert load_records(out, tmp_path / "moved")
