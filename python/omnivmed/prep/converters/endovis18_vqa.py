"""EndoVis18-VQA (Seenivasan et al., Surgical-VQA, 2022): per-frame question files
`seq_<N>/vqa/Classification/frame<NNN>_QA.txt` (one "question|answer" per line) and the
challenge's frames `seq_<N>/left_frames/frame<NNN>.png`. Split by sequence, as the
Surgical-VQA release trains and validates: train 2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15;
validation 1, 5, 16. Every answer is one label of the dataset's label set (organ, tool
state, tool location), so every record is closed; question types come from the
question templates (organ / state / location)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import CONVERTERS, Converter, Problems

TRAIN = (2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15)
VALIDATION = (1, 5, 16)
_FILE = re.compile(r"^(frame\d+)_QA\.txt$")


def question_type(question: str) -> str | None:
    q = question.lower()
    if "organ" in q:
        return "organ"
    if "state" in q:
        return "state"
    if "located" in q or "location" in q or "where" in q:
        return "location"
    return None


@CONVERTERS.register("endovis18-vqa")
class EndoVis18Vqa(Converter):
    dataset = "EndoVis18-VQA"
    splits: ClassVar[dict[str, tuple[int, ...]]] = {"train": TRAIN, "validation": VALIDATION}

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        for split, sequences in self.splits.items():
            for seq in sequences:
                folder = self.require(root / f"seq_{seq}" / "vqa" / "Classification",
                                      f"the question files of sequence {seq}")  # fmt: skip
                for qa_file in sorted(folder.glob("*.txt")):
                    match = _FILE.match(qa_file.name)
                    if not match:
                        problems.add(qa_file, "not named frame<NNN>_QA.txt")
                        continue
                    image = f"seq_{seq}/left_frames/{match.group(1)}.png"
                    if not self.image_ok(root, image, problems, qa_file, "frame"):
                        continue
                    for number, index, (question, answer) in self.question_answer_lines(
                        qa_file, problems
                    ):
                        yield self.record(
                            f"endovis18-seq{seq}-{match.group(1)}-{index}", image, question,
                            answer, dataset=self.dataset, split=split, modality="endoscopy",
                            answer_type="closed", question_type=question_type(question),
                            language="en", source_id=f"seq_{seq}/{qa_file.name}:{number}",
                        )  # fmt: skip
