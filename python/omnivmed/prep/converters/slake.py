"""SLAKE (Liu et al., 2021): `train.json`, `validate.json`, `test.json` and `imgs/`.
Fields used: qid, img_name, question, answer, q_lang (en/zh), answer_type (OPEN/CLOSED),
modality, content_type, location. Split: the file. Images are split by image: one image
in two splits is an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import CONVERTERS, Converter, Problems

SPLITS = {"train": "train.json", "validate": "validate.json", "test": "test.json"}


@CONVERTERS.register("slake")
class Slake(Converter):
    dataset = "SLAKE"
    expected_counts: ClassVar[dict[str, int]] = {"train": 9835, "validate": 2099, "test": 2094}

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        self.require(root / "imgs", "the image folder imgs/")
        for split, file in SPLITS.items():
            source = self.require(root / file, f"SLAKE's {split} questions")
            rows = self.read_json_list(source, "SLAKE's JSON")
            for i, r in enumerate(rows):
                key = f"entry {i}"
                qa = self.open_closed_qa(r, source, key, problems, "qid", "img_name", "q_lang")
                if qa is None:
                    continue
                question, answer, answer_type, qid, image, lang = qa
                if not self.image_ok(root, f"imgs/{image}", problems, source, key):
                    continue
                yield self.record(
                    f"slake-{split}-{qid}", f"imgs/{image}", question, answer,
                    dataset=self.dataset, split=split, modality=r.get("modality"),
                    answer_type=answer_type, question_type=r.get("content_type"),
                    location=r.get("location"), language=lang, source_id=str(qid),
                )  # fmt: skip
