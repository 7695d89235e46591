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
from omnivmed.data.records import load_records
from omnivmed.evaluation import score_files
from omnivmed.prep.converters import ConversionError, convert_dataset
from omnivmed.prep.converters.safe_pickle import RefusedPickle, load_plain_pickle


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
    assert closed["volumes"] == [{"path": "vol/train.npy", "intensity": "none"}]
    assert closed["conversations"][0]["value"].startswith("<image3d>")
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
    every_split = ["--splits", "train,validate,test"]  # the training split alone is the default
    assert (
        main(["mix", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "out"), *every_split]) == 0
    )
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


# ---- Cholec80-VQA and PSI-AVA-VQA ---------------------------------------------------------
@pytest.mark.parametrize("frames", ["cropped_image", "cropped_images"])
def test_cholec80_vqa_by_video(tmp_path, frames):
    root = tmp_path / "c80"
    for video in range(1, 41):
        qa = root / "Classification" / str(video)
        qa.mkdir(parents=True)
        for frame in (0, 100, 150):  # 150 is not a question frame of the release
            image(root / frames / str(video) / f"{frame}.png", video)
            (qa / f"{frame}_QA.txt").write_text(
                "what is the phase of image?|preparation\nis grasper used in preparation?|yes\n"
                "how many tools are operating?|1\n\n" + ("no bar here\n" if video == 5 else "")
            )
    summary = convert_dataset("cholec80-vqa", root, tmp_path / "c.jsonl")
    assert summary["counts"]["split"] == {"train": 32 * 6, "validation": 8 * 6}
    assert summary["counts"]["question_type"] == {"count": 80, "phase": 80, "tool": 80}
    assert summary["left_out_by_rule"] == {"frame number not a multiple of 100": 40}
    assert list(summary["problems"]) == [str(root / "Classification/5/0_QA.txt"),
                                         str(root / "Classification/5/100_QA.txt")]  # fmt: skip
    rec = read_jsonl(tmp_path / "c.jsonl")[0]
    assert rec["images"] == [f"{frames}/1/0.png"] and rec["split"] == "train"
    other = "cropped_images" if frames == "cropped_image" else "cropped_image"
    (root / other).mkdir()
    with pytest.raises(ConversionError, match=r"both \['cropped_image', 'cropped_images'\]"):
        convert_dataset("cholec80-vqa", root, tmp_path / "c.jsonl")


def test_psi_ava_vqa(tmp_path):
    root = tmp_path / "psi"
    for case in ("CASE001", "CASE021"):
        image(root / "keyframes" / case / "00001.jpg")
    for folder, case in (("Train", "CASE001"), ("Val", "CASE021")):
        (root / folder).mkdir(parents=True)
        for file, q, a in (("C1_location.txt", "Where is the Bipolar Forceps located ?", "top left"),
                           ("C3_phase.txt", "What is the phase?", "LPAD"),
                           ("C4_step.txt", "What is the step?", "Anudar")):  # fmt: skip
            (root / folder / file).write_text(f"{case}/00001.jpg|{q}|{a}\n"
                                              f"{case}/99999.jpg|{q}|{a}\nonly|two\n../x.jpg|{q}|{a}\n")  # fmt: skip
        (root / folder / "C2_action.txt").write_text(f"{case}/00001.jpg|What action?|['Hold']\n")
    summary = convert_dataset("psi-ava-vqa", root, tmp_path / "p.jsonl")
    assert summary["counts"]["split"] == {"train": 3, "validation": 3}
    assert summary["counts"]["question_type"] == {"location": 2, "phase": 2, "step": 2}
    assert sum(summary["problems"].values()) == 18  # a missing frame, a short line, a bad path
    rec = read_jsonl(tmp_path / "p.jsonl")[0]
    assert rec["images"] == ["keyframes/CASE001/00001.jpg"] and rec["case"] == "CASE001"
    (root / "Val" / "C1_location.txt").write_text("CASE001/00001.jpg|Where?|top left\n")
    with pytest.raises(ConversionError, match="appear in more than one split"):
        convert_dataset("psi-ava-vqa", root, tmp_path / "p.jsonl")


# ---- OmniMedVQA and PubMedVision ----------------------------------------------------------
def test_omnimedvqa(tmp_path):
    root = tmp_path / "omni"
    image(root / "Images" / "ACRIMA" / "Im553_g_ACRIMA.png")
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    base = {"dataset": "ACRIMA", "question_type": "Modality Recognition", "image_path": "Images/ACRIMA/Im553_g_ACRIMA.png",
            "question": "What imaging technique is shown?", "modality_type": "Fundus Photography"}  # fmt: skip
    rows = [
        {**base, "question_id": "ACRIMA_0000", "gt_answer": "Fundus imaging", "option_A": "CT",
         "option_B": "MRI", "option_C": "X-ray", "option_D": "Fundus imaging"},
        {**base, "question_id": "ACRIMA_0001", "gt_answer": "Yes", "option_A": "Yes", "option_B": "No"},
        {**base, "question_id": "ACRIMA_0002", "gt_answer": "Maybe", "option_A": "Yes", "option_B": "No"},
        {**base, "question_id": "ACRIMA_0000", "gt_answer": "CT", "option_A": "CT", "option_B": "MRI"},
    ]  # fmt: skip
    (qa / "ACRIMA.json").write_text(json.dumps(rows))
    summary = convert_dataset("omnimedvqa", root, tmp_path / "o.jsonl")
    assert summary["counts"]["split"] == {"test": 2}
    assert summary["problems"] == {str(qa / "ACRIMA.json"): 2}  # no option matches; duplicate id
    first, second = read_jsonl(tmp_path / "o.jsonl")
    assert first["answer_choice"] == "D" and first["choices"][3] == "Fundus imaging"
    assert (
        second["choices"] == ["Yes", "No"]
        and "Choices: A. Yes B. No" in second["conversations"][0]["value"]
    )
    assert first["modality"] == "Fundus Photography" and first["source_dataset"] == "ACRIMA"


def test_pubmedvision(tmp_path):
    root = tmp_path / "pmv"
    for n in range(3):
        image(root / "images" / f"pmc_{n}_0.jpg", n)
    rows = [
        {"id": "Alignment_VQA_0", "image": ["images/pmc_0_0.jpg", "images/pmc_1_0.jpg"], "modality": "CT",
         "body_part": "Chest", "conversations": [{"from": "human", "value": "Describe both."},
                                                  {"from": "gpt", "value": "Two CT slices."}]},
        {"id": "Alignment_VQA_1", "image": ["images/pmc_2_0.jpg"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        {"id": "Alignment_VQA_2", "image": ["images/pmc_9_0.jpg"],
         "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]},
    ]  # fmt: skip
    (root / "PubMedVision_Alignment_VQA.json").write_text(json.dumps(rows))
    summary = convert_dataset("pubmedvision-alignment", root, tmp_path / "a.jsonl")
    assert summary["records"] == 1 and summary["matches_documented_counts"] is False
    problems = summary["problems"][str(root / "PubMedVision_Alignment_VQA.json")]
    assert problems == 2  # two markers for one image; the missing pmc_9_0.jpg
    rec = read_jsonl(tmp_path / "a.jsonl")[0]
    assert rec["conversations"][0]["value"] == "<image>\n<image>\nDescribe both."
    assert rec["answer"] == "Two CT slices." and rec["body_part"] == "Chest"
    assert len(load_records(tmp_path / "a.jsonl", root)[0].media) == 2
    with pytest.raises(
        ConversionError, match=r"PubMedVision_InstructionTuning_VQA\.json is missing"
    ):
        convert_dataset("pubmedvision-instruct", root, tmp_path / "i.jsonl")


# ---- M3D-Cap and MedM-VL ------------------------------------------------------------------
def test_m3d_cap(tmp_path):
    from omnivmed.processing.readers import read_volume

    root = tmp_path / "m3d"
    table = {}
    for split in ("train", "validation", "test"):
        case = root / "M3D_Cap_npy" / "ct_quizze" / f"{split}01"
        case.mkdir(parents=True)
        np.save(
            case / "Axial.npy", np.random.default_rng(0).random((1, 4, 16, 16)).astype(np.float32)
        )
        (case / "text.txt").write_text(
            "  The liver shows a hypodense lesion.\n" if split != "test" else "\n"
        )
        table[split] = [{"image": f"M3D_Cap_npy/ct_quizze/{split}01/Axial.npy",
                         "text": f"M3D_Cap_npy/ct_quizze/{split}01/text.txt"}]  # fmt: skip
    table["train"].append({"image": "M3D_Cap_npy/none.npy", "text": "x.txt"})
    (root / "M3D_Cap_npy" / "M3D_Cap.json").write_text(json.dumps(table))
    summary = convert_dataset("m3d-cap", root, tmp_path / "cap.jsonl")
    assert summary["counts"]["split"] == {"train": 1, "validation": 1}
    assert summary["problems"] == {
        str(root / "M3D_Cap_npy/M3D_Cap.json"): 2
    }  # empty report, missing volume
    rec = load_records(tmp_path / "cap.jsonl", root)[0]
    assert rec.meta["answer"] == "The liver shows a hypodense lesion."
    assert rec.conversations[0]["value"].startswith("<image3d>\n") and rec.media[0][2] == {
        "intensity": "none"
    }
    assert read_volume(rec.media[0][1]).data.shape == (4, 16, 16)
    (root / "M3D_Cap_npy" / "M3D_Cap.json").write_text(json.dumps({"train": []}))
    with pytest.raises(ConversionError, match=r"\['validation', 'test'\] are missing"):
        convert_dataset("m3d-cap", root, tmp_path / "cap.jsonl")


def test_medm_vl_records(tmp_path):
    root = tmp_path / "medm"
    image(root / "img" / "a.png")
    (root / "ct").mkdir(parents=True)
    np.save(root / "ct" / "v.npy", np.full((4, 8, 8), -1000.0, np.float32))
    train = [
        {"id": "0", "image": ["img/a.png"], "task": "vqa", "data_source": "SLAKE",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Lung."}]},
        {"id": "1", "image": ["img/a.png"], "conversations": [{"from": "human", "value": "What?"},
                                                              {"from": "gpt", "value": "x"}]},
    ]  # fmt: skip
    infer = [
        {"id": "long_answer_0", "image3d": ["ct/v.npy"], "answer": "No abnormality.",
         "conversations": [{"from": "human", "value": "<image>\nAny findings?"}]},
        {"id": "long_answer_1", "image3d": ["ct/v.npy"],
         "conversations": [{"from": "human", "value": "<image3d>\nAny findings?"}]},
    ]  # fmt: skip
    (root / "finetune_2d.json").write_text(json.dumps(train))
    (root / "inference_3d.json").write_text(json.dumps(infer))
    summary = convert_dataset("medm-vl", root, tmp_path / "m.jsonl")
    assert summary["counts"]["split"] == {"test": 1, "train": 1}
    assert sum(summary["problems"].values()) == 2  # no marker; no answer
    recs = {r.id: r for r in load_records(tmp_path / "m.jsonl", root)}
    two_d = recs["medm-vl-finetune_2d-0"]
    assert two_d.meta["dataset"] == "SLAKE" and two_d.meta["question_type"] == "vqa"
    three_d = recs["medm-vl-inference_3d-long_answer_0"]
    assert three_d.conversations[0]["value"].startswith("<image3d>\n")
    assert three_d.conversations[-1] == {"from": "gpt", "value": "No abnormality."}
    assert three_d.media[0][2] == {"intensity": "ct_window", "ct_window": (0.0, 2000.0)}
    assert three_d.meta["split"] == "test"


# ---- MIMIC-CXR ----------------------------------------------------------------------------
# Lines start with a space and blank lines hold one space, as in the release.
REPORT = "\n".join([
    "                                 FINAL REPORT",
    " EXAMINATION:  CHEST (PA AND LAT)", " ",
    " INDICATION:  ___ with cough", " ",
    " COMPARISON:  None.", " ",
    " FINDINGS:", " ",
    " The lungs are clear.  There is no pleural effusion",
    " or pneumothorax.", " ",
    " IMPRESSION:", " ",
    " No acute cardiopulmonary process.", "",
])  # fmt: skip


def test_report_sections():
    from omnivmed.prep.converters.mimic_cxr import report_sections

    sections = report_sections(REPORT)
    assert (
        sections["findings"] == "The lungs are clear. There is no pleural effusion or pneumothorax."
    )
    assert sections["impression"] == "No acute cardiopulmonary process."
    assert sections["examination"] == "CHEST (PA AND LAT)" and sections["comparison"] == "None."
    other = report_sections(" PA AND LATERAL VIEWS OF THE CHEST:\n Heart size normal.\n"
                            " FINDINGS AND IMPRESSION: Stable.\n CONCLUSION:\n \n")  # fmt: skip
    assert other == {"findings": "Heart size normal.", "impression": "Stable."}
    assert report_sections(" No headers at all.") == {}


def test_mimic_cxr(tmp_path):
    import gzip

    root = tmp_path / "mimic"
    rows = [("d1", "50000001", "10000001", "train", "PA"), ("d2", "50000001", "10000001", "train", "LATERAL"),
            ("d3", "50000002", "10000002", "test", "AP"), ("d4", "50000003", "10000003", "validate", "PA"),
            ("d5", "50000004", "10000004", "train", "PA"), ("d6", "50000005", "10000005", "nope", "PA")]  # fmt: skip
    for dicom, study, subject, _, _ in rows:
        image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    reports = {"50000001": REPORT, "50000002": REPORT, "50000003": " IMPRESSION: Clear lungs.\n"}
    for _, study, subject, _, _ in rows:
        if study in reports:
            (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(
                reports[study]
            )
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write(
            "dicom_id,study_id,subject_id,split\n"
            + "".join(f"{d},{s},{p},{sp}\n" for d, s, p, sp, _ in rows)
        )
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\n" + "".join(f"{d},{p},{s},{v}\n" for d, s, p, _, v in rows)
    )  # fmt: skip
    summary = convert_dataset("mimic-cxr", root, tmp_path / "m.jsonl")
    assert summary["counts"]["split"] == {"test": 1, "train": 1}
    assert summary["left_out_by_rule"] == {
        "report has no findings section": 1,
        "view not frontal (LATERAL)": 1,
    }
    # d5's report is missing; d6's split is not an official one.
    assert summary["problems"] == {str(root / "mimic-cxr-2.0.0-split.csv.gz"): 2}
    rec = read_jsonl(tmp_path / "m.jsonl")[0]
    assert rec["images"] == ["files/p10/p10000001/s50000001/d1.jpg"] and rec["view"] == "PA"
    assert rec["answer"].startswith("The lungs are clear.") and rec["impression"].startswith(
        "No acute"
    )
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(ConversionError, match=r"mimic-cxr-2.0.0-metadata.csv.gz is missing"):
        convert_dataset("mimic-cxr", root, tmp_path / "m.jsonl")
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(ConversionError, match="not a readable table"):
        convert_dataset("mimic-cxr", root, tmp_path / "m.jsonl")


# ---- hostile releases: counted per file, never a traceback, never a record training refuses
def test_hostile_entries_are_counted_not_crashing(tmp_path):
    from omnivmed.prep.converters.mimic_cxr import report_sections

    # A byte-order mark does not cost PSI-AVA's first line.
    root = tmp_path / "psi"
    image(root / "keyframes" / "CASE001" / "00001.jpg")
    image(root / "keyframes" / "CASE021" / "00001.jpg")
    for folder, case in (("Train", "CASE001"), ("Val", "CASE021")):
        (root / folder).mkdir(parents=True)
        for file in ("C1_location.txt", "C3_phase.txt", "C4_step.txt"):
            (root / folder / file).write_text(
                f"\ufeff{case}/00001.jpg|Where?|top left\n", encoding="utf-8"
            )
    assert convert_dataset("psi-ava-vqa", root, tmp_path / "p.jsonl")["records"] == 6
    # M3D-Cap: a report path outside the data root is refused, not read.
    m3d = tmp_path / "m3d"
    (m3d / "v").mkdir(parents=True)
    np.save(m3d / "v" / "a.npy", np.zeros((1, 2, 4, 4), np.float32))
    (tmp_path / "secret.txt").write_text("secret")
    (m3d / "v" / "a.txt").write_text("Normal.")
    table = {"train": [{"image": "v/a.npy", "text": "../secret.txt"}, {"image": "v/a.npy", "text": "v/a.txt"}],
             "validation": [], "test": []}  # fmt: skip
    (m3d / "M3D_Cap.json").write_text(json.dumps(table))
    summary = convert_dataset("m3d-cap", m3d, tmp_path / "c.jsonl")
    assert summary["records"] == 1 and "secret" not in (tmp_path / "c.jsonl").read_text()
    # PubMedVision: non-path images, no final answer, a literal <video> in the text.
    pmv = tmp_path / "pmv"
    image(pmv / "images" / "a.jpg")
    turns = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]
    rows = [{"id": "0", "image": [5], "conversations": turns},
            {"id": "1", "image": ["images/a.jpg"], "conversations": turns[:1] * 2},
            {"id": "2", "image": ["images/a.jpg"], "conversations": [turns[0], {"from": "gpt", "value": "<video>"}]},
            {"id": "3", "image": "images/a.jpg", "conversations": turns}]  # fmt: skip
    (pmv / "PubMedVision_Alignment_VQA.json").write_text(json.dumps(rows))
    summary = convert_dataset("pubmedvision-alignment", pmv, tmp_path / "a.jsonl")
    assert summary["records"] == 1 and sum(summary["problems"].values()) == 3
    assert summary["problems"]["pubmedvision-alignment record checks"] == 1
    load_records(tmp_path / "a.jsonl", pmv)  # what was written loads
    # MedM-VL: media of the wrong type, a 2D record marked as a volume.
    medm = tmp_path / "medm"
    image(medm / "a.png")
    rows = [{"id": "0", "image": {"x": 1}, "conversations": [{"from": "human", "value": "<image>"}, turns[1]]},
            {"id": "1", "image": ["a.png"], "conversations": [{"from": "human", "value": "<image3d>Q"}, turns[1]]},
            {"id": "2", "image": ["a.png"], "conversations": [{"from": "human", "value": "<image>Q"}, turns[1]]}]  # fmt: skip
    (medm / "train.json").write_text(json.dumps(rows))
    summary = convert_dataset("medm-vl", medm, tmp_path / "m.jsonl")
    assert summary["records"] == 1 and sum(summary["problems"].values()) == 2
    # Cholec80: a stray second question file of a frame does not collide with the first.
    c80 = tmp_path / "c80"
    for video in range(1, 41):
        (c80 / "Classification" / str(video)).mkdir(parents=True)
    image(c80 / "cropped_image" / "1" / "100.png")
    for name in ("100_QA.txt", "100_QA_old.txt"):
        (c80 / "Classification" / "1" / name).write_text(
            "what is the phase of image?|preparation\n"
        )
    assert convert_dataset("cholec80-vqa", c80, tmp_path / "c80.jsonl")["records"] == 2
    # MIMIC-CXR: a REVIEW header does not replace the findings; view headers only stand in.
    sections = report_sections(" FINDINGS: Lungs clear.\n REVIEW OF PRIOR: Dr. X reviewed.\n")
    assert (
        sections["findings"] == "Lungs clear." and sections["review of prior"] == "Dr. X reviewed."
    )
    sections = report_sections(" FINDINGS: Lungs clear.\n PORTABLE AP VIEW: Tubes in place.\n")
    assert sections["findings"] == "Lungs clear."


def test_mimic_cxr_short_rows_are_counted(tmp_path):
    import gzip

    root = tmp_path / "mimic"
    image(root / "files/p10/p10000001/s50000001/d1.jpg")
    (root / "files/p10/p10000001/s50000001.txt").write_text(" FINDINGS: Clear.\n")
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id,split\nd1,50000001,10000001,train\nd2,50000002\n")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,ViewPosition\nd1,PA\nd2\n")
    summary = convert_dataset("mimic-cxr", root, tmp_path / "m.jsonl")
    assert summary["records"] == 1
    assert summary["problems"] == {str(root / "mimic-cxr-2.0.0-split.csv.gz"): 1}
