"""SLAKE (Liu et al., 2021): `train.json`, `validate.json`, `test.json` and `imgs/`.
Fields used: qid, img_name, question, answer, q_lang (en/zh), answer_type (OPEN/CLOSED),
modality, content_type, location. Split: the file. Images are split by image: one image
in two splits is an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import ConversionError, Converter, Problems

SPLITS = {"train": "train.json", "validate": "validate.json", "test": "test.json"}


class Slake(Converter):
    name = "slake"
    dataset = "SLAKE"
    expected_counts: ClassVar[dict[str, int]] = {"train": 9835, "validate": 2099, "test": 2094}

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        self.require(root / "imgs", "the image folder imgs/")
        for split, file in SPLITS.items():
            source = self.require(root / file, f"SLAKE's {split} questions")
            try:
                rows = json.loads(source.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConversionError(f"{source}: not SLAKE's JSON ({exc})") from None
            for i, r in enumerate(rows):
                key = f"entry {i}"
                try:
                    qid, image, lang = r["qid"], r["img_name"], r["q_lang"]
                    question, answer = str(r["question"]).strip(), str(r["answer"]).strip()
                    answer_type = str(r["answer_type"]).strip().lower()
                except (KeyError, TypeError) as exc:
                    problems.add(source, f"{key}: field {exc} is missing")
                    continue
                if answer_type not in ("open", "closed"):
                    problems.add(source, f"{key}: answer_type {r['answer_type']!r}")
                    continue
                if not self.image_ok(root, f"imgs/{image}", problems, source, key):
                    continue
                yield self.record(
                    f"slake-{split}-{qid}", f"imgs/{image}", question, answer,
                    dataset=self.dataset, split=split, modality=r.get("modality"),
                    answer_type=answer_type, question_type=r.get("content_type"),
                    location=r.get("location"), language=lang, source_id=str(qid),
                )  # fmt: skip
