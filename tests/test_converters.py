"""omnivmed-data convert / validate: each source's release layout written by the test,
converted; what must be refused is refused, naming the file and what was expected."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnivmed.cli.data import main
from omnivmed.data.converters import ConversionError, convert_dataset
from omnivmed.data.converters.safe_pickle import RefusedPickle, load_plain_pickle
from omnivmed.data.records import load_records
from omnivmed.evaluation import score_files


def image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---- VQA-RAD ------------------------------------------------------------------------------
def vqa_rad_tree(root: Path, with_answer_type: bool = True) -> Path:
    folder = root / "VQA_RAD Image Folder"
    for name in ("synpic1.jpg", "synpic2.jpg"):
        image(folder / name)
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes",
         "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "freeform", "image_organ": "CHEST"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Where is the mass?", "answer": "left lung",
         "answer_type": "OPEN", "question_type": "POS", "phrase_type": "test_freeform", "image_organ": "CHEST"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Is this normal?", "answer": "no",
         "answer_type": "CLOSED", "question_type": "ABN", "phrase_type": "test_para", "image_organ": "HEAD"},
        {"qid": 4, "image_name": "missing.jpg", "question": "?", "answer": "x",
         "answer_type": "OPEN", "question_type": "PRES", "phrase_type": "para", "image_organ": "HEAD"},
    ]  # fmt: skip
    if not with_answer_type:
        for r in rows:
            r.pop("answer_type")
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


def test_vqa_rad(tmp_path, capsys):
    root = vqa_rad_tree(tmp_path / "rad")
    out = tmp_path / "rad.jsonl"
    assert main(["convert", "vqa-rad", "--input", str(root), "--out", str(out)]) == 0
    records = read_jsonl(out)
    assert [r["split"] for r in records] == ["train", "test", "test"]
    assert [r["answer_type"] for r in records] == ["closed", "open", "closed"]
    assert records[1]["images"] == ["VQA_RAD Image Folder/synpic1.jpg"]
    assert records[1]["conversations"][0]["value"].startswith("<image>\n")
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["problems"] == {
        str(root / "VQA_RAD Dataset Public.json"): 1
    }  # the missing image
    assert summary["images_in_several_splits"] == 1  # questions are split, not images
    assert summary["matches_documented_counts"] is False  # 2 test records, not the release's 451
    assert len(summary["sha256"]) == 64
    assert "skipped 1 entries" in capsys.readouterr().out
    assert load_records(out, root)[0].meta["answer_type"] == "closed"  # loads for training
    with pytest.raises(ConversionError, match=r"missing\.jpg is missing"):
        convert_dataset("vqa-rad", root, tmp_path / "s.jsonl", strict=True)


def test_vqa_rad_mirror_without_answer_type_is_refused(tmp_path):
    root = vqa_rad_tree(tmp_path / "mirror", with_answer_type=False)
    with pytest.raises(ConversionError, match=r"no 'answer_type' field.*must not be guessed"):
        convert_dataset("vqa-rad", root, tmp_path / "o.jsonl")


def test_layout_errors_name_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"VQA_RAD Dataset Public\.json is missing: expected"):
        convert_dataset("vqa-rad", tmp_path / "empty", tmp_path / "o.jsonl")
    with pytest.raises(ConversionError, match="unknown source 'nope'"):
        convert_dataset("nope", tmp_path / "empty", tmp_path / "o.jsonl")
    assert main(["convert", "slake", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o.jsonl")]) == 2  # fmt: skip
    assert "imgs is missing" in capsys.readouterr().err


# ---- SLAKE --------------------------------------------------------------------------------
def slake_tree(root: Path, leak: bool = False) -> Path:
    for i in range(3):
        image(root / "imgs" / f"xmlab{i}" / "source.jpg", i)

    def row(qid, img, lang, q, a, t):
        return {"qid": qid, "img_name": f"xmlab{img}/source.jpg", "q_lang": lang, "question": q, "answer": a,
                "answer_type": t, "modality": "CT", "content_type": "Organ", "location": "Lung"}  # fmt: skip

    (root / "train.json").write_text(json.dumps([row(1, 0, "en", "Is this a CT?", "Yes", "CLOSED"),
                                                 row(2, 0, "zh", "这是什么器官?", "肺", "OPEN")]))  # fmt: skip
    (root / "validate.json").write_text(
        json.dumps([row(3, 1, "en", "Which organ?", "Lung", "OPEN")])
    )
    (root / "test.json").write_text(json.dumps([row(4, 0 if leak else 2, "en", "Is it normal?", "No", "CLOSED")]))  # fmt: skip
    return root


def test_slake_and_its_split_check(tmp_path):
    root = slake_tree(tmp_path / "slake")
    summary = convert_dataset("slake", root, tmp_path / "slake.jsonl")
    assert summary["counts"]["split"] == {"test": 1, "train": 2, "validate": 1}
    assert summary["counts"]["language"] == {"en": 3, "zh": 1}
    records = read_jsonl(tmp_path / "slake.jsonl")
    assert records[1]["answer"] == "肺" and records[1]["language"] == "zh"
    # The converted file is a reference file for omnivmed-eval as it is.
    preds = tmp_path / "p.jsonl"
    preds.write_text(
        "".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n" for r in records)
    )
    assert (
        score_files(tmp_path / "slake.jsonl", preds, "strict", tmp_path / "s")["overall"][
            "closed_accuracy"
        ]
        == 1.0
    )
    leaky = slake_tree(tmp_path / "leaky", leak=True)
    with pytest.raises(ConversionError, match=r"appear in more than one split.*test.*train"):
        convert_dataset("slake", leaky, tmp_path / "l.jsonl")


# ---- PathVQA -------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/omnivmed_pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"image": "x", "question": "q", "answer": _Evil()}]))
    with pytest.raises(RefusedPickle, match=r"refers to (posix|os)\.system"):
        load_plain_pickle(evil)
    assert not Path("/tmp/omnivmed_pwned").exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([{"a": [1, 2.5, "x", None, True]}], protocol=4))
    assert load_plain_pickle(plain) == [{"a": [1, 2.5, "x", None, True]}]


def test_path_vqa(tmp_path):
    root = tmp_path / "pathvqa"
    for split in ("train", "val", "test"):
        image(root / "images" / split / f"{split}_0001.jpg")
        qa = [{"image": f"{split}_0001", "question": "Is this malignant?", "answer": "yes"},
              {"image": f"{split}_0001", "question": "What is shown?", "answer": "necrosis"}]  # fmt: skip
        (root / "qas" / split).mkdir(parents=True)
        (root / "qas" / split / f"{split}_qa.pkl").write_bytes(pickle.dumps(qa))
    summary = convert_dataset("path-vqa", root, tmp_path / "p.jsonl")
    assert summary["counts"]["answer_type"] == {"closed": 3, "open": 3}
    (root / "qas" / "val" / "val_qa.pkl").write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(ConversionError, match=r"val_qa\.pkl: refused"):
        convert_dataset("path-vqa", root, tmp_path / "p.jsonl")


# ---- PMC-VQA and M3D-VQA --------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_pmc_vqa(tmp_path):
    root = tmp_path / "pmc"
    for split, fig in (("train", "a.jpg"), ("test", "b.jpg")):
        image(root / "images" / fig)
        write_csv(root / f"{split}_2.csv", [{
            "Figure_path": fig, "Question": "Which modality?", "Answer": "CT",
            "Choice A": " A:MRI", "Choice B": " B:CT", "Choice C": " C:PET", "Choice D": " D:US",
            "Answer_label": "B"}])  # fmt: skip
    convert_dataset("pmc-vqa", root, tmp_path / "pmc.jsonl")
    rec = read_jsonl(tmp_path / "pmc.jsonl")[0]
    assert rec["choices"] == ["MRI", "CT", "PET", "US"] and rec["answer_choice"] == "B"
    assert "Choices: A. MRI B. CT" in rec["conversations"][0]["value"]


def test_m3d_vqa(tmp_path):
    root = tmp_path / "m3d"
    for split in ("train", "val", "test"):
        (root / "vol").mkdir(parents=True, exist_ok=True)
        np.save(
            root / "vol" / f"{split}.npy",
            np.random.default_rng(0).random((1, 4, 16, 16)).astype(np.float32),
        )
        write_csv(root / f"M3D_VQA_{split}.csv", [{
            "Image Path": f"vol/{split}.npy", "Text": "report", "Question Type": "3",
            "Question": "Which organ is abnormal?", "Choice A": "liver", "Choice B": "lung",
            "Choice C": "kidney", "Choice D": "heart", "Answer": "The liver.", "Answer Choice": "A"}])  # fmt: skip
    summary = convert_dataset("m3d-vqa", root, tmp_path / "m3d.jsonl")
    assert summary["records"] == 6 and summary["counts"]["question_type"] == {"organ": 6}
    closed, open_ = read_jsonl(tmp_path / "m3d.jsonl")[:2]
    assert closed["volumes"] == ["vol/train.npy"] and closed["conversations"][0][
        "value"
    ].startswith("<image3d>")
    assert (
        closed["answer_choice"] == "A" and open_["answer_type"] == "open" and "choices" not in open_
    )
    write_csv(root / "M3D_VQA_val.csv", [{"Image Path": "x.npy"}])
    with pytest.raises(ConversionError, match=r"M3D_VQA_val\.csv: columns \[.*'Question Type'"):
        convert_dataset("m3d-vqa", root, tmp_path / "m3d.jsonl")


# ---- validate ----------------------------------------------------------------------------
def test_validate_reports_schema_and_media_problems(tmp_path, capsys):
    image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"id": "a", "images": ["ok.png"], "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "b", "images": ["gone.png"], "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "c", "images": ["broken.png"], "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "d", "images": ["ok.png"], "conversations": [{"from": "human", "value": "no marker"}]},
        {"id": "a", "conversations": [{"from": "human", "value": "text only"}], "answer_type": "yes/no"},
    ]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    assert main(["validate", str(data)]) == 1
    out = capsys.readouterr().out
    assert "3 of 6 records parse" in out
    for expected in ("gone.png is missing", "broken.png is unreadable", "0 visual markers",
                     "line 6: invalid JSON", "'answer_type' must be one of"):  # fmt: skip
        assert expected in out, expected
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps(rows[0]) + "\n")
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_mix_deduplicates_samples_to_ratios_and_reports_the_distribution(tmp_path, capsys):
    import yaml

    slake = convert_dataset("slake", slake_tree(tmp_path / "slake"), tmp_path / "slake.jsonl")
    rad_root = vqa_rad_tree(tmp_path / "rad")
    convert_dataset("vqa-rad", rad_root, tmp_path / "rad.jsonl")
    # The same VQA-RAD file twice: the second copy is all duplicates.
    mixture = {"seed": 1, "num_samples": 10, "datasets": [
        {"path": "slake.jsonl", "root": "slake", "ratio": 0.6},
        {"path": "rad.jsonl", "root": "rad", "ratio": 0.4},
        {"path": "rad.jsonl", "root": "rad", "ratio": 0.0}]}  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    assert main(["mix", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out/mixture.summary.json").read_text())
    assert [s["drawn"] for s in summary["sources"]] == [6, 4, 0]
    assert summary["sources"][2]["duplicates"] == 3 and summary["sources"][0]["upsampled"]
    assert summary["records"] == 10 and sum(summary["modality"].values()) == 10
    assert (tmp_path / "out/distribution.png").stat().st_size > 0
    rows = read_jsonl(tmp_path / "out/mixture.jsonl")
    assert len({r["id"] for r in rows}) == 10  # upsampled copies get their own ids
    # The mixture loads for training with the data root it reports.
    records = load_records(tmp_path / "out/mixture.jsonl", summary["data_root"])
    assert all(Path(p).is_file() for r in records for _, p, _ in r.media)
    assert "upsampled" in capsys.readouterr().out
    assert slake["records"] == 4


def test_endovis18_vqa_by_sequence(tmp_path):
    root = tmp_path / "endovis"
    for seq in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16):
        image(root / f"seq_{seq}" / "left_frames" / "frame000.png", seq)
        qa = root / f"seq_{seq}" / "vqa" / "Classification"
        qa.mkdir(parents=True)
        (qa / "frame000_QA.txt").write_text(
            "What organ is being operated?|kidney\nWhat is the state of bipolar_forceps?|Idle\n"
            "Where is bipolar_forceps located?|left-top\n" + ("broken line\n" if seq == 2 else "")
        )
    summary = convert_dataset("endovis18-vqa", root, tmp_path / "e.jsonl")
    assert summary["counts"]["split"] == {"train": 33, "validation": 9}
    assert summary["counts"]["question_type"] == {"location": 14, "organ": 14, "state": 14}
    assert summary["problems"] == {str(root / "seq_2/vqa/Classification/frame000_QA.txt"): 1}
    rec = read_jsonl(tmp_path / "e.jsonl")[0]
    assert rec["images"] == ["seq_2/left_frames/frame000.png"] and rec["answer_type"] == "closed"
    # Scored with the surgical profile: labels from the references, macro metrics.
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n"
                             for r in read_jsonl(tmp_path / "e.jsonl")))  # fmt: skip
    overall = score_files(tmp_path / "e.jsonl", preds, "surgical", tmp_path / "s")["overall"]
    assert overall["accuracy"] == 1.0 and overall["macro_f1"] == 1.0
    import shutil

    shutil.rmtree(root / "seq_16")
    with pytest.raises(
        ConversionError, match=r"seq_16.*is missing: expected the question files of sequence 16"
    ):
        convert_dataset("endovis18-vqa", root, tmp_path / "e.jsonl")
