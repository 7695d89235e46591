"""`llava-med` (version 1): LLaVA-Med's published scoring rules reproduced as they are,
quirks included, so that numbers reported with them can be compared. Each quirk is named
in docs/metrics.md ("llava-med"); the `strict` profile is the one to trust.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from . import PROFILES, Profile

# Its normalisation (borrowed in turn from the VQA evaluation): listed once here.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = ("a", "an", "the")
# Quirk: the lookahead "(?!<=\d)" was meant as a look-behind, so a period is removed
# unless a digit follows it, and `sub`'s third argument (re.UNICODE, 32) is a count:
# at most 32 periods are removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
# Apostrophe-less spellings mapped back, as its contraction table does for the common ones.
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in [
        "ain't",
        "aren't",
        "can't",
        "couldn't",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hasn't",
        "haven't",
        "he'd",
        "he'll",
        "he's",
        "i'd",
        "i'll",
        "i'm",
        "i've",
        "isn't",
        "it'd",
        "it'll",
        "let's",
        "ma'am",
        "mightn't",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "o'clock",
        "shan't",
        "she'd",
        "she'll",
        "she's",
        "should've",
        "shouldn't",
        "that's",
        "there's",
        "they'd",
        "they'll",
        "they're",
        "they've",
        "wasn't",
        "we'd",
        "we're",
        "we've",
        "weren't",
        "what's",
        "where's",
        "who's",
        "who'll",
        "won't",
        "would've",
        "wouldn't",
        "you'd",
        "you'll",
        "you're",
        "you've",
        "y'all",
    ]
}


def normalize_word(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Quirk: whether a mark is deleted or becomes a space depends on the whole string.
        if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, 32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def word_counts(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def f1_precision_recall(pred: str, ref: str) -> tuple[float, float, float]:
    """Quirk: true positives count the prediction's repeats ("lung lung lung" against
    "left lung": tp = 3, recall 3 / (3 + 1) = 0.75)."""
    cand, refs = word_counts(normalize_word(pred)), word_counts(normalize_word(ref))
    if not cand or not refs:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in cand.items() if w in refs)
    fp = sum(n for w, n in cand.items() if w not in refs)
    fn = sum(n for w, n in refs.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r), p, r


def exact_match(pred: str, ref: str) -> float:
    """Quirk: not exact; distinct reference words found / number of predicted words."""
    cand, refs = word_counts(normalize_word(pred)), word_counts(normalize_word(ref))
    total = sum(cand.values())
    return sum(1 for w in refs if w in cand) / total if total else 0.0


def bleu4_unsmoothed(pred: str, ref: str) -> float:
    """Quirk: nltk's sentence BLEU-4 without smoothing (about 0 for one-word answers)."""
    import warnings

    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count
        value = sentence_bleu([ref.lower().split()], pred.lower().split())
    return 0.0 if math.isnan(value) else float(value)


@PROFILES.register("llava-med")
class LlavaMedProfile(Profile):
    version = "1"
    metrics = ("closed_accuracy", "open_recall", "open_f1", "open_exact_match", "bleu4")
    required_fields = ("answer", "answer_type")

    def score(self, ref: dict, prediction: str) -> tuple[dict[str, Any], dict[str, float]]:
        gt = normalize_word(str(ref["answer"]).lower())
        pred = normalize_word(str(prediction).lower())
        details = {"prediction_normalized": pred, "answer_normalized": gt}
        if str(ref["answer_type"]).lower().startswith("close"):
            # Quirk: substring tests. Any "yes"/"no" substring (as in "know", "nodule",
            # "normal") opens the gate; then the answer must occur inside the prediction.
            hit = ("yes" in pred or "no" in pred) and gt in pred
            return details, {"closed_accuracy": float(hit)}
        f1, _, recall = f1_precision_recall(pred, gt)
        return details, {
            "open_recall": recall,
            "open_f1": f1,
            "open_exact_match": exact_match(pred, gt),
            "bleu4": bleu4_unsmoothed(pred, gt),
        }
