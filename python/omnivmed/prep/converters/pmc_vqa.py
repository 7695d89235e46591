"""PMC-VQA (Zhang et al., 2023): `train_2.csv` / `test_2.csv` (the cleaned second
version; `train.csv` / `test.csv` when those are absent) and `images/` with the figures.
Columns used: Figure_path, Question, Answer, Choice A..D (each "A:text"), Answer_label.
Every question is multiple choice (closed). Splits are by figure."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import CONVERTERS, Converter, Problems

COLUMNS = ("Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
           "Answer_label")  # fmt: skip
_PREFIX = re.compile(r"^\s*[A-D]\s*[:.)]\s*")


@CONVERTERS.register("pmc-vqa")
class PmcVqa(Converter):
    dataset = "PMC-VQA"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        self.require(root / "images", "the figure folder images/")
        for split in ("train", "test"):
            source = root / f"{split}_2.csv"
            if not source.is_file():
                source = self.require(
                    root / f"{split}.csv", f"PMC-VQA's {split}_2.csv or {split}.csv"
                )
            for i, key, r in self.read_csv_rows(source, COLUMNS):
                image = f"images/{r['Figure_path'].strip()}"
                if not self.image_ok(root, image, problems, source, key):
                    continue
                letter = r["Answer_label"].strip().upper()
                if letter not in ("A", "B", "C", "D"):
                    problems.add(source, f"{key}: Answer_label {letter!r} is not A-D")
                    continue
                choices = [_PREFIX.sub("", r[f"Choice {c}"]).strip() for c in "ABCD"]
                options = " ".join(f"{c}. {t}" for c, t in zip("ABCD", choices, strict=True))
                yield self.record(
                    f"pmc-vqa-{split}-{i}", image, f"{r['Question'].strip()} Choices: {options}",
                    r["Answer"].strip(), dataset=self.dataset, split=split, modality=None,
                    answer_type="closed", choices=choices, answer_choice=letter,
                    language="en", source_id=f"{split}/{i}",
                )  # fmt: skip
