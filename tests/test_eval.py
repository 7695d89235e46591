"""omnivmed-eval: every scoring rule on the cases that decide it, the llava-med profile
against LLaVA-Med's published formulas, the files `score` writes and refuses, and `run`
end to end on a saved tiny model (resume after SIGKILL, 2-process sharding, blank media)."""

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
from PIL import Image

from omnivmed.cli.eval import main
from omnivmed.evaluation import ScoringError, get_profile, score_files
from omnivmed.evaluation.profiles.llava_med import normalize_word
from omnivmed.evaluation.text import normalize, tokens
from omnivmed.models import build_preset
from omnivmed.processing.processor import ProcessorOptions

STRICT = get_profile("strict")


def closed(pred, answer, **extra):
    return STRICT.score({"answer": answer, "answer_type": "closed", **extra}, pred)


def open_(pred, answer, profile=STRICT):
    return profile.score({"answer": answer, "answer_type": "open"}, pred)[1]


@pytest.mark.parametrize(
    "pred, answer, hit",
    [
        ("Yes.", "yes", 1), ("yes", "yes", 1), ("YES", "yes", 1), ("No", "no", 1),
        ("I don't know", "no", 0), ("I do not know.", "yes", 0), ("not sure", "no", 0),
        ("Yes, a nodule is present.", "no", 0), ("Yes, a nodule is present.", "yes", 1),
        ("Normal", "no", 0), ("Nodule", "no", 0), ("no nodule is seen", "no", 1),
        ("There is no nodule.", "no", 0),  # no decision word opens a clause
        ("Yes, there is no nodule", "yes", 1), ("yes and no", "yes", 0), ("yes and no", "no", 0),
        ("", "yes", 0), ("   ", "no", 0), ("Yes. No other findings.", "yes", 1),
        ("Yes, no mass is seen.", "yes", 1), ("The answer is no.", "no", 1), ("Yes/No", "yes", 0),
        ("no or yes", "no", 0),
    ],
)  # fmt: skip
def test_strict_yes_no(pred, answer, hit):
    assert closed(pred, answer)[1] == {"closed_accuracy": float(hit)}


CHOICES = ["left lung", "right lung", "heart", "liver"]


@pytest.mark.parametrize(
    "pred, picked",
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B:", "B"), ("B) right lung", "B"),
        ("B. right lung", "B"), ("The answer is B", "B"), ("the correct option is (B).", "B"),
        ("\\boxed{B}", "B"), ("right lung", "B"), ("The right lung.", "B"),
        ("A nodule in the right lung", "B"),  # the article "A" is no option letter
        ("B or C", None), ("A and B", None), ("lung", None), ("", None), ("E", None),
        ("The answer is a right lung.", "B"),  # "a" is an article, not option A
    ],
)  # fmt: skip
def test_strict_multiple_choice(pred, picked):
    details, scores = closed(pred, "right lung", choices=CHOICES)
    assert details["picked"] == picked
    assert scores["closed_accuracy"] == float(picked == "B")


def test_strict_other_closed_answers_match_exactly():
    assert closed("The Liver.", "liver")[1]["closed_accuracy"] == 1.0
    assert closed("liver and spleen", "liver")[1]["closed_accuracy"] == 0.0


def test_strict_open_metrics():
    s = open_("lung lung lung", "left lung")
    assert s["open_recall"] == 0.5  # set-based: repeats count once
    assert s["open_exact_match"] == 0.0
    assert open_("2", "two")["open_exact_match"] == 1.0  # number words
    assert open_("The left lung!", "left lung")["open_exact_match"] == 1.0
    empty = open_("", "left lung")
    assert all(v == 0.0 for v in empty.values())
    assert open_("left lung", "left lung")["open_f1"] == 1.0
    assert 0 < open_("lung", "left lung")["bleu1"] < 1  # smoothed, not 0 for one word


def test_normalisation_and_cjk_tokens():
    assert normalize("The Left-Lung, 1,000 cells; 2.5 mm") == "left lung 1000 cells 2.5 mm"
    assert tokens(normalize("左肺上叶")) == ["左", "肺", "上", "叶"]
    assert open_("左肺", "左肺上叶")["open_recall"] == 0.5


# LLaVA-Med's published formulas, written out independently for the cases below:
# recall = tp / (tp + fn) with tp counting the prediction's repeats; "exact match" =
# distinct reference words found / predicted words; closed: ("yes" in p or "no" in p) and
# gt in p, all on its normalised lower-case strings.
LLAVA_CASES = [
    ("lung lung lung", "left lung", {"open_recall": 0.75}),
    ("left lung", "left lung lobe", {"open_exact_match": 1.0}),  # not exact
    ("left lung lobe", "left lung", {"open_exact_match": 2 / 3, "open_recall": 1.0}),
    ("the right lung", "left lung", {"open_recall": 0.5, "open_f1": 0.5}),
]


@pytest.mark.parametrize("pred, answer, expected", LLAVA_CASES)
def test_llava_med_open_formulas(pred, answer, expected):
    scores = open_(pred, answer, get_profile("llava-med"))
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value), name


@pytest.mark.parametrize(
    "pred, answer, hit",
    [
        ("I don't know", "no", 1),  # "know" holds "no"
        ("Yes, a nodule is present.", "no", 1),  # "nodule" holds "no"
        ("yes", "yes", 1), ("no", "yes", 0), ("maybe", "no", 0), ("normal", "no", 1),
    ],
)  # fmt: skip
def test_llava_med_closed_quirks(pred, answer, hit):
    scores = get_profile("llava-med").score({"answer": answer, "answer_type": "CLOSED"}, pred)[1]
    assert scores["closed_accuracy"] == hit


def test_llava_med_normalisation_and_bleu():
    assert normalize_word("the two left-lungs, (a) test.") == "2 left lungs test"
    # Quirk: one spaced hyphen anywhere makes every hyphen vanish instead of splitting.
    assert normalize_word("left-lung") == "left lung"
    assert normalize_word("left-lung - x") == "leftlung x"
    assert open_("yes", "yes", get_profile("llava-med"))["bleu4"] < 1e-6  # unsmoothed BLEU-4


def test_m3d_choice_rule():
    m3d = get_profile("m3d")
    ref = {"answer": "liver", "answer_type": "closed", "answer_choice": "C"}
    assert m3d.score(ref, "C. liver")[1]["closed_accuracy"] == 1.0
    assert m3d.score(ref, "C")[1]["closed_accuracy"] == 0.0  # the letter needs its period
    open_scores = m3d.score({"answer": "a liver lesion", "answer_type": "open"}, "liver lesion")[1]
    assert open_scores["bleu1"] > 0 and open_scores["rouge1"] > 0
    assert any("BERTScore not computed" in n for n in m3d.notes)


# ---- files --------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REFS = [
    {"id": "q1", "answer": "yes", "answer_type": "closed", "dataset": "VQA-RAD", "modality": "CT"},
    {"id": "q2", "answer": "left lung", "answer_type": "open", "dataset": "VQA-RAD", "modality": "X-ray"},
    {"id": "q3", "answer": "no", "answer_type": "closed", "dataset": "SLAKE", "modality": "MRI"},
]  # fmt: skip


def test_score_writes_summary_samples_and_report(tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", REFS)
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "q2", "prediction": "the left lung"}, {"id": "q1", "prediction": "Yes."},
        {"id": "zz", "prediction": "extra"},
    ])  # fmt: skip
    summary = score_files(refs, preds, "strict", tmp_path / "out")
    assert summary["overall"]["closed_accuracy"] == 0.5  # q3 has no prediction: wrong
    assert summary["overall"]["open_exact_match"] == 1.0
    assert summary["counts"]["missing_predictions"] == 1
    assert summary["counts"]["extra_predictions"] == 1
    assert summary["by"]["dataset"]["SLAKE"]["closed_accuracy"] == 0.0
    assert summary["by"]["modality"]["CT"]["closed_accuracy"] == 1.0
    assert set(summary) >= {"profile", "metric_version", "overall", "by", "counts", "provenance"}
    samples = [json.loads(x) for x in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["q1", "q2", "q3"]
    assert samples[1]["prediction_normalized"] == "left lung"
    assert all(0 <= v <= 1 for s in samples for v in s["scores"].values())
    assert "| VQA-RAD |" in (tmp_path / "out/report.md").read_text()


def test_score_refuses_bad_input(tmp_path, capsys):
    refs = write_jsonl(tmp_path / "refs.jsonl", REFS)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "q1", "prediction": "a"}, {"id": "q1", "prediction": "b"}])  # fmt: skip
    with pytest.raises(ScoringError, match=r"dup.jsonl:2: duplicate id 'q1' \(first on line 1\)"):
        score_files(refs, dup, "strict", tmp_path / "o")
    good = write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "prediction": "yes"}])
    with pytest.raises(ScoringError, match="unknown profile 'nope'"):
        score_files(refs, good, "nope", tmp_path / "o")
    no_type = write_jsonl(tmp_path / "r2.jsonl", [{"id": "q1", "answer": "yes"}])
    with pytest.raises(ScoringError, match=r"r2.jsonl:1: field 'answer_type' is missing"):
        score_files(no_type, good, "strict", tmp_path / "o")
    bad_pred = write_jsonl(tmp_path / "p2.jsonl", [{"id": "q1", "text": "yes"}])
    with pytest.raises(ScoringError, match=r"p2.jsonl:1: field 'prediction'"):
        score_files(refs, bad_pred, "strict", tmp_path / "o")
    rc = main(["score", "--references", str(refs), "--predictions", str(dup), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "duplicate id" in capsys.readouterr().err


# ---- run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    model_dir = root / "model"
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ProcessorOptions(max_pixels=48 * 48, min_pixels=32 * 32).save(model_dir)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append({"id": f"s{i}", "images": [f"img{i}.png"],
                     "conversations": [{"from": "human", "value": "<image>\nIs it normal?"}],
                     "answer": "yes" if i % 2 else "no", "answer_type": "closed",
                     "dataset": "demo", "modality": "fundus"})  # fmt: skip
    return model_dir, write_jsonl(root / "bench.jsonl", rows)


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_run_then_score_and_blank_visual(tmp_path, bench):
    model_dir, benchmark = bench
    assert main(["run", str(model_dir), "--benchmark", str(benchmark), "--out", str(tmp_path / "r"),
                 "--max-new-tokens", "3", "--score", "strict"]) == 0  # fmt: skip
    preds = read_predictions(tmp_path / "r/predictions.jsonl")
    assert [p["id"] for p in preds] == [f"s{i}" for i in range(6)]
    assert all(p["visual_tokens"] > 0 for p in preds)
    summary = json.loads((tmp_path / "r/scores/summary.json").read_text())
    assert summary["counts"]["scored"] == 6
    settings = json.loads((tmp_path / "r/run.json").read_text())
    assert settings["max_new_tokens"] == 3 and settings["blank_visual"] is False
    assert main(["run", str(model_dir), "--benchmark", str(benchmark), "--out", str(tmp_path / "b"),
                 "--max-new-tokens", "3", "--blank-visual"]) == 0  # fmt: skip
    blank = read_predictions(tmp_path / "b/predictions.jsonl")
    assert [p["visual_tokens"] for p in blank] == [p["visual_tokens"] for p in preds]
    # a finished run is not answered again, and other settings in the same folder are refused
    assert main(["run", str(model_dir), "--benchmark", str(benchmark), "--out", str(tmp_path / "r"),
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert read_predictions(tmp_path / "r/predictions.jsonl") == preds
    assert main(["run", str(model_dir), "--benchmark", str(benchmark), "--out", str(tmp_path / "r"),
                 "--max-new-tokens", "4"]) == 2  # fmt: skip


def _eval_command(model_dir, benchmark, out, tokens_=6, batch_size=2):
    # Two records per generate call: a kill lands between written batches too.
    return [sys.executable, "-m", "omnivmed.cli.eval", "run", str(model_dir), "--benchmark",
            str(benchmark), "--out", str(out), "--max-new-tokens", str(tokens_), "--device", "cpu",
            "--batch-size", str(batch_size)]  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_answers_each_id_once(tmp_path, bench):
    model_dir, benchmark = bench
    out = tmp_path / "k"
    proc = subprocess.Popen(_eval_command(model_dir, benchmark, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    part = out / "predictions.partial.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.is_file() and len(part.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_predictions(part)) if part.is_file() else 0
    assert done_before >= 2
    # A kill mid-write leaves a partial last line: the resume drops it.
    with part.open("a") as f:
        f.write('{"id": "s5", "predi')
    subprocess.run(_eval_command(model_dir, benchmark, out), check=True, capture_output=True)
    rows = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(6)]
    assert len(read_predictions(part)) == 6  # no id answered twice
    single = tmp_path / "single"
    subprocess.run(_eval_command(model_dir, benchmark, single), check=True, capture_output=True)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in read_predictions(single / "predictions.jsonl")]  # fmt: skip


@pytest.mark.slow
def test_two_process_shards_match_one_process(tmp_path, bench):
    model_dir, benchmark = bench
    one = tmp_path / "one"
    subprocess.run(_eval_command(model_dir, benchmark, one, 4), check=True, capture_output=True)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29631", *_eval_command(model_dir, benchmark, two, 4)[1:]]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    assert (two / "predictions.rank1.jsonl").is_file()
    strip = lambda rows: [(r["id"], r["prediction"], r["visual_tokens"]) for r in rows]  # noqa: E731
    assert strip(read_predictions(two / "predictions.jsonl")) == strip(read_predictions(one / "predictions.jsonl"))  # fmt: skip


def test_records_keep_and_check_the_evaluation_fields(tmp_path):
    from omnivmed.data.records import RecordError, load_records

    base = {"id": "x", "conversations": [{"from": "human", "value": "Q?"}], "answer": "B",
            "answer_type": "closed", "choices": ["a", "b"], "answer_choice": "B",
            "dataset": "PMC-VQA", "split": "test", "modality": "CT", "question_type": "organ",
            "language": "en"}  # fmt: skip
    record = load_records(write_jsonl(tmp_path / "ok.jsonl", [base]))[0]
    assert {k: record.meta[k] for k in ("answer_type", "choices", "answer_choice", "split")} == {
        "answer_type": "closed",
        "choices": ["a", "b"],
        "answer_choice": "B",
        "split": "test",
    }
    for bad, match in [({"answer_type": "CLOSED"}, "answer_type"), ({"choices": "a,b"}, "choices"),
                       ({"answer_choice": "C"}, "answer_choice"), ({"dataset": ["x"]}, "dataset")]:  # fmt: skip
        with pytest.raises(RecordError, match=match):
            load_records(write_jsonl(tmp_path / "bad.jsonl", [{**base, **bad}]))


def test_run_refuses_media_outside_the_data_root(tmp_path, bench, capsys):
    model_dir, _ = bench
    outside = write_jsonl(tmp_path / "b.jsonl", [{
        "id": "x", "images": ["../../etc/passwd.png"], "answer": "yes", "answer_type": "closed",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}]}])  # fmt: skip
    rc = main(["run", str(model_dir), "--benchmark", str(outside), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "points outside the data root" in capsys.readouterr().err


def test_meteor_with_wordnet_or_a_note_saying_why_not(monkeypatch, tmp_path):
    from omnivmed.evaluation import captions

    # Without WordNet: no meteor value at all, and a note that says why and what to do.
    with monkeypatch.context() as m:
        m.setattr(captions, "_wordnet_roots", lambda: [tmp_path])
        captions.wordnet.cache_clear()
        profile = get_profile("strict")
        scores = profile.score({"answer": "left lung", "answer_type": "open"}, "left lung")[1]
        assert "meteor" not in scores
        assert any("METEOR not computed" in n and "fetch_wordnet.sh" in n for n in profile.notes)
    captions.wordnet.cache_clear()
    if captions.wordnet()[0] is None:
        pytest.skip("no WordNet here (scripts/fetch_wordnet.sh provides it)")
    assert captions.meteor(["left", "lung"], ["left", "lung"]) == pytest.approx(0.9375)
    assert 0 < captions.meteor(["lesions"], ["lesion"]) < 1  # stems match
    assert "meteor" in open_("the left lung", "left lung")


def test_surgical_label_matching_and_macro_scores(tmp_path):
    refs = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "1", "answer": "grasper", "answer_type": "closed", "dataset": "EndoVis18-VQA"},
        {"id": "2", "answer": "bipolar forceps", "answer_type": "closed", "dataset": "EndoVis18-VQA"},
        {"id": "3", "answer": "grasper", "answer_type": "closed", "dataset": "EndoVis18-VQA"},
        {"id": "4", "answer": "clipper", "answer_type": "closed", "dataset": "EndoVis18-VQA"},
    ])  # fmt: skip
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "prediction": "The grasper."},  # the label inside the answer
        {"id": "2", "prediction": "grasper"},  # a wrong label
        {"id": "3", "prediction": "grasper or clipper"},  # two labels: wrong, not guessed
        {"id": "4", "prediction": "Clipper"},
    ])  # fmt: skip
    summary = score_files(refs, preds, "surgical", tmp_path / "o")
    o = summary["overall"]
    assert o["accuracy"] == 0.5
    # grasper: P 1/2, R 1/2; bipolar forceps: P 0, R 0; clipper: P 1, R 1 -> macro over 3
    assert o["macro_precision"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert o["macro_recall"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert o["macro_f1"] == pytest.approx((0.5 + 0 + 1) / 3)
    samples = [json.loads(x) for x in (tmp_path / "o/samples.jsonl").read_text().splitlines()]
    assert samples[2]["read"] == "several labels" and samples[2]["label"] is None


def test_batched_answers_equal_one_at_a_time(tmp_path):
    # Prompts of different lengths (left padding) and images of different sizes, and a
    # tiny model with large random LLM weights, so that its answers depend on the input.
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ProcessorOptions(max_pixels=48 * 48, min_pixels=32 * 32).save(model_dir)
    rng = np.random.default_rng(1)
    rows = []
    for i, (size, question) in enumerate([(40, "Q?"), (64, "Is there a lesion in the left lobe?"),
                                          (32, "What organ is this, and is it normal?")]):  # fmt: skip
        Image.fromarray((rng.random((size, size + 8, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        rows.append({"id": f"b{i}", "images": [f"{i}.png"], "answer": "yes", "answer_type": "closed",
                     "conversations": [{"from": "human", "value": f"<image>\\n{question}"}]})  # fmt: skip
    rows.append({"id": "text", "answer": "no", "answer_type": "closed",
                 "conversations": [{"from": "human", "value": "No image: yes or no?"}]})  # fmt: skip
    benchmark = write_jsonl(tmp_path / "b.jsonl", rows)
    outs = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        assert main(["run", str(model_dir), "--benchmark", str(benchmark), "--out", str(out),
                     "--max-new-tokens", "8", "--batch-size", str(bs)]) == 0  # fmt: skip
        outs[bs] = [(r["id"], r["prediction"], r["visual_tokens"]) for r in read_predictions(out / "predictions.jsonl")]  # fmt: skip
    assert outs[1] == outs[4]
    assert len({p for _, p, _ in outs[1]}) > 1  # the answers are not all the same text


def test_m3d_bertscore_from_a_local_model_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "left",
        "right",
        "lung",
        "liver",
        "lesion",
        "is",
        "clear",
        "mass",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=64).save_pretrained(
        tmp_path / "bert"
    )
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    refs = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "1", "answer": "left lung lesion", "answer_type": "open"},
        {"id": "2", "answer": "liver", "answer_type": "open"}])  # fmt: skip
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "prediction": "left lung lesion"}, {"id": "2", "prediction": "right lung mass"}])  # fmt: skip
    summary = score_files(
        refs, preds, "m3d", tmp_path / "o", bertscore_model=str(tmp_path / "bert")
    )
    samples = [json.loads(x) for x in (tmp_path / "o/samples.jsonl").read_text().splitlines()]
    assert samples[0]["scores"]["bertscore"] == pytest.approx(1.0, abs=1e-5)  # identical text
    assert samples[1]["scores"]["bertscore"] < 0.99
    assert any("layer 2" in n for n in summary["notes"])
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
        score_files(refs, preds, "m3d", tmp_path / "o", bertscore_model=str(tmp_path / "nothing"))


def test_metric_selection_and_a_baseline_beside_the_run(tmp_path, capsys):
    refs = write_jsonl(tmp_path / "refs.jsonl", REFS)
    run = write_jsonl(tmp_path / "run.jsonl", [
        {"id": "q1", "prediction": "yes"}, {"id": "q2", "prediction": "left lung"},
        {"id": "q3", "prediction": "no"}])  # fmt: skip
    blank = write_jsonl(tmp_path / "blank.jsonl", [
        {"id": "q1", "prediction": "no"}, {"id": "q2", "prediction": "heart"},
        {"id": "q3", "prediction": "no"}])  # fmt: skip
    summary = score_files(refs, run, "strict", tmp_path / "o",
                          metrics=["closed_accuracy", "open_recall"], baseline=blank)  # fmt: skip
    assert set(summary["overall"]) == {"closed_accuracy", "open_recall"}
    assert summary["baseline"]["overall"] == {"closed_accuracy": 0.5, "open_recall": 0.0}
    report = (tmp_path / "o/report.md").read_text()
    assert "| closed_accuracy | 100.0 | 50.0 | +50.0 |" in report
    with pytest.raises(ScoringError, match=r"unknown metric\(s\) \['bleu9'\] for profile 'strict'"):
        score_files(refs, run, "strict", tmp_path / "o", metrics=["bleu9"])
    assert main(["profiles"]) == 0
    assert "closed_accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_with_another_world_size_answers_nothing_twice(tmp_path, bench):
    model_dir, benchmark = bench
    out = tmp_path / "w"
    # A 2-process run stopped after its first shard file: rank 0 answered s0, s2, s4.
    part = out / "predictions.rank0.jsonl"
    subprocess.run(
        _eval_command(model_dir, benchmark, tmp_path / "one"), check=True, capture_output=True
    )
    full = read_predictions(tmp_path / "one" / "predictions.jsonl")
    out.mkdir()
    part.write_text("".join(json.dumps(r) + "\n" for r in full if r["id"] in ("s0", "s2", "s4")))
    (out / "run.json").write_text((tmp_path / "one" / "run.json").read_text())
    # Resumed as one process: only the other three are answered, the merge has all six.
    subprocess.run(_eval_command(model_dir, benchmark, out), check=True, capture_output=True)
    single = read_predictions(out / "predictions.partial.jsonl")
    assert sorted(r["id"] for r in single) == ["s1", "s3", "s5"]
    assert [r["id"] for r in read_predictions(out / "predictions.jsonl")] == [
        f"s{i}" for i in range(6)
    ]
