"""`strict` (version 2): omnivmed's own rules (docs/metrics.md, "strict"). Version 2: the
first clause-opening yes/no decides, "the answer is" opens a clause, and only joined
pairs ("yes and no", "yes/no") are ambiguous; option letters are capitals only."""

from __future__ import annotations

import re
from typing import Any

from .. import captions
from ..text import normalize, tokens
from . import PROFILES, Profile

YES, NO = "yes", "no"
# Answers that decline to decide are wrong, whatever yes/no words they hold.
REFUSALS = (
    "dont know", "do not know", "not sure", "unsure", "cannot determine", "can not determine",
    "cannot tell", "can not tell", "unable to determine", "not possible to determine",
    "no idea", "cannot be determined", "uncertain",
)  # fmt: skip
# A yes/no word decides where a clause starts: at the start, after a punctuation mark, a
# conjunction or "the answer is". The first such word decides ("Yes, there is no nodule"
# and "Yes. No other findings" decide yes; "there is no nodule" decides nothing); the two
# joined ("yes and no", "no or yes") are ambiguous, so wrong.
_CLAUSE_START = re.compile(
    r"(?:^|[.,;:!?]|\b(?:and|or|but)\b|\banswer is\b)\s*(yes|no)\b", re.IGNORECASE
)
_BOTH = re.compile(r"\b(yes|no)\s*(?:/|\b(?:and|or)\b)\s*(yes|no)\b", re.IGNORECASE)
_LETTER = r"((?-i:[A-Z]))"  # a capital letter, also inside case-insensitive patterns
_CHOICE_PATTERNS = [
    re.compile(rf"^\s*\(?{_LETTER}\)?\s*[.:)]?\s*$"),  # "B", "(B)", "B.", "B:", "B)"
    re.compile(rf"\\boxed\{{\s*\(?{_LETTER}\)?\s*\}}"),  # \boxed{B}
    re.compile(
        rf"\b(?:the )?(?:correct )?(?:answer|option|choice) is:?\s*\(?{_LETTER}\)?(?![A-Za-z])",
        re.IGNORECASE,
    ),
    re.compile(rf"^\s*\(?{_LETTER}\)?\s*[.:)]\s"),  # "B. text", "(B) text", "B: text"
    re.compile(rf"^\s*\({_LETTER}\)\s"),
]


def yes_no_decision(prediction: str) -> str | None:
    """ "yes", "no", "ambiguous", "refusal" or None (no decision)."""
    flat = normalize(prediction)
    if any(r in flat for r in REFUSALS):
        return "refusal"
    text = prediction.replace("\u2019", "'")
    if any(m.group(1).lower() != m.group(2).lower() for m in _BOTH.finditer(text)):
        return "ambiguous"
    first = _CLAUSE_START.search(text)
    return first.group(1).lower() if first else None


def choice_letter(prediction: str, choices: list[str]) -> tuple[str | None, str]:
    """The option a prediction picks: (letter or None, how it was read)."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    for pattern in _CHOICE_PATTERNS:
        picked = {m.group(1).upper() for m in pattern.finditer(prediction)}
        picked &= set(letters)
        if len(picked) == 1:
            return picked.pop(), "letter"
        if len(picked) > 1:
            return None, "ambiguous letters " + "/".join(sorted(picked))
    # "B or C": two bare letters named anywhere is ambiguous, never guessed
    bare = {m.group(1) for m in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", prediction)}
    if len(bare & set(letters)) > 1:
        return None, "ambiguous letters " + "/".join(sorted(bare & set(letters)))
    norm = normalize(prediction)
    texts = [normalize(c) for c in choices]
    exact = [letters[i] for i, t in enumerate(texts) if t and t == norm]
    if len(exact) == 1:
        return exact[0], "option text"
    inside = [
        letters[i]
        for i, t in enumerate(texts)
        if t and re.search(rf"(?:^| ){re.escape(t)}(?: |$)", norm)
    ]
    if len(inside) == 1:
        return inside[0], "option text"
    if len(inside) > 1:
        return None, "several option texts"
    return None, "no option found"


def reference_letter(ref: dict) -> str:
    if ref.get("answer_choice"):
        return str(ref["answer_choice"]).strip().strip("().").upper()
    answer = normalize(ref["answer"])
    for i, c in enumerate(ref["choices"]):
        if normalize(c) == answer:
            return chr(ord("A") + i)
    return ""


@PROFILES.register("strict")
class StrictProfile(Profile):
    version = "2"
    metrics = (
        "closed_accuracy",
        "open_recall",
        "open_exact_match",
        "open_f1",
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "rouge1",
        "rouge_l",
        "meteor",
    )
    required_fields = ("answer", "answer_type")

    def check_reference(self, ref: dict, where: str) -> None:
        super().check_reference(ref, where)
        from . import ScoringError

        if ref["answer_type"] not in ("closed", "open"):
            raise ScoringError(
                f"{where}: field 'answer_type' must be 'closed' or 'open', got {ref['answer_type']!r}"
            )
        if ref.get("choices") is not None and not reference_letter(ref):
            raise ScoringError(
                f"{where}: the answer {ref['answer']!r} is none of the 'choices' and no "
                "'answer_choice' names one"
            )

    def score(self, ref: dict, prediction: str) -> tuple[dict[str, Any], dict[str, float]]:
        answer, pred = normalize(ref["answer"]), normalize(prediction)
        details: dict[str, Any] = {"prediction_normalized": pred, "answer_normalized": answer}
        if ref["answer_type"] == "closed":
            if ref.get("choices"):
                want = reference_letter(ref)
                got, how = choice_letter(prediction, list(ref["choices"]))
                details.update(rule="choice", picked=got, read=how, expected=want)
                hit = got == want
            elif answer in (YES, NO):
                decision = yes_no_decision(prediction)
                details.update(rule="yes/no", decision=decision)
                hit = decision == answer
            else:
                details.update(rule="exact")
                hit = bool(pred) and pred == answer
            return details, {"closed_accuracy": float(hit)}
        ref_tokens, pred_tokens = tokens(answer), tokens(pred)
        common = set(ref_tokens) & set(pred_tokens)
        recall = len(common) / len(set(ref_tokens)) if ref_tokens else 0.0
        overlap = sum(min(ref_tokens.count(t), pred_tokens.count(t)) for t in common)
        precision = overlap / len(pred_tokens) if pred_tokens else 0.0
        f1 = 2 * precision * (overlap / len(ref_tokens)) / (precision + overlap / len(ref_tokens)) if overlap else 0.0  # fmt: skip
        scores = {
            "open_recall": recall,
            "open_exact_match": float(bool(pred) and pred == answer),
            "open_f1": f1,
        }
        for n in (1, 2, 3, 4):
            scores[f"bleu{n}"] = captions.bleu(ref_tokens, pred_tokens, n)
        scores.update(captions.rouge(ref_tokens, pred_tokens))
        self.add_meteor(scores, ref_tokens, pred_tokens)
        details["rule"] = "open"
        return details, scores
