"""PathVQA (He et al., 2020): `qas/{train,val,test}/{split}_qa.pkl` (lists of
{image, question, answer}) and `images/{train,val,test}/<image>.jpg`. The pickles are read
with a restricted unpickler (plain containers and strings only). answer_type: PathVQA
defines its closed-ended questions as the yes/no ones, so an answer of "yes" or "no" is
closed and every other answer open (the dataset's own rule). Splits are by image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import CONVERTERS, ConversionError, Converter, Problems
from .safe_pickle import RefusedPickle, load_plain_pickle

SPLITS = ("train", "val", "test")


@CONVERTERS.register("path-vqa")
class PathVqa(Converter):
    dataset = "PathVQA"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        for split in SPLITS:
            source = self.require(
                root / "qas" / split / f"{split}_qa.pkl", f"PathVQA's {split} questions"
            )
            self.require(root / "images" / split, f"PathVQA's {split} images")
            self.release_file(source)
            try:
                rows = load_plain_pickle(source)
            except RefusedPickle as exc:
                raise ConversionError(f"{source}: {exc}") from None
            except Exception as exc:  # truncated or not a pickle at all
                raise ConversionError(f"{source}: not a readable pickle ({exc})") from None
            if not isinstance(rows, list):
                raise ConversionError(
                    f"{source}: expected a list of questions, got {type(rows).__name__}"
                )
            for i, r in enumerate(rows):
                key = f"entry {i}"
                if not isinstance(r, dict) or not all(
                    k in r for k in ("image", "question", "answer")
                ):
                    problems.add(source, f"{key}: expected image, question and answer")
                    continue
                image = f"images/{split}/{r['image']}.jpg"
                if not self.image_ok(root, image, problems, source, key):
                    continue
                answer = str(r["answer"]).strip()
                yield self.record(
                    f"path-vqa-{split}-{i}", image, str(r["question"]).strip(), answer,
                    dataset=self.dataset, split=split, modality="pathology",
                    answer_type="closed" if answer.lower() in ("yes", "no") else "open",
                    language="en", source_id=f"{split}/{i}",
                )  # fmt: skip
