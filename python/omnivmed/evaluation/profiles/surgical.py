"""`surgical` (version 1): surgical VQA (Cholec80-VQA, EndoVis18-VQA, PSI-AVA-VQA), where
every answer is one label of the dataset's label set. The label set of a dataset is its
`choices` where a record gives them, else every distinct normalised answer of that
dataset in the references. A prediction is read as the label it equals after
normalisation, else the one label it contains as whole words; none or several is wrong
(never guessed). Metrics: `accuracy` per sample, and over each group the macro average of
per-label precision, recall and F1 (labels that occur as answers or predictions; 0 where
a label is never predicted)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from ..text import normalize
from . import PROFILES, Profile


@PROFILES.register("surgical")
class SurgicalProfile(Profile):
    version = "1"
    metrics = ("accuracy", "macro_precision", "macro_recall", "macro_f1")

    def prepare(self, references: list[dict]) -> None:
        self.labels: dict[str, set[str]] = defaultdict(set)
        for ref in references:
            dataset = str(ref.get("dataset") or "")
            if ref.get("choices"):
                self.labels[dataset].update(normalize(c) for c in ref["choices"])
            self.labels[dataset].add(normalize(ref["answer"]))

    def read_label(self, prediction: str, labels: set[str]) -> tuple[str | None, str]:
        pred = normalize(prediction)
        if pred in labels:
            return pred, "label"
        inside = [
            lab for lab in labels if lab and re.search(rf"(?:^| ){re.escape(lab)}(?: |$)", pred)
        ]
        # A label inside a longer one ("grasper" in "grasper retraction") counts once.
        inside = [
            lab for lab in inside
            if not any(lab != o and re.search(rf"(?:^| ){re.escape(lab)}(?: |$)", o) for o in inside)
        ]  # fmt: skip
        if len(inside) == 1:
            return inside[0], "label inside the answer"
        return None, "several labels" if inside else "no label"

    def score(self, ref: dict, prediction: str) -> tuple[dict[str, Any], dict[str, float]]:
        labels = self.labels[str(ref.get("dataset") or "")]
        expected = normalize(ref["answer"])
        label, how = self.read_label(prediction, labels)
        details = {"label": label, "expected_label": expected, "read": how}
        return details, {"accuracy": float(label == expected)}

    def group_metrics(self, samples: list[dict]) -> dict[str, float]:
        tp, fp, fn = defaultdict(int), defaultdict(int), defaultdict(int)
        for s in samples:
            want, got = s["expected_label"], s["label"]
            if got == want:
                tp[want] += 1
            else:
                fn[want] += 1
                if got is not None:
                    fp[got] += 1
        labels = set(tp) | set(fp) | set(fn)
        if not labels:
            return {}
        p = {lab: tp[lab] / (tp[lab] + fp[lab]) if tp[lab] + fp[lab] else 0.0 for lab in labels}
        r = {lab: tp[lab] / (tp[lab] + fn[lab]) if tp[lab] + fn[lab] else 0.0 for lab in labels}
        f = {
            lab: 2 * p[lab] * r[lab] / (p[lab] + r[lab]) if p[lab] + r[lab] else 0.0
            for lab in labels
        }
        n = len(labels)
        return {"macro_precision": sum(p.values()) / n, "macro_recall": sum(r.values()) / n,
                "macro_f1": sum(f.values()) / n}  # fmt: skip
