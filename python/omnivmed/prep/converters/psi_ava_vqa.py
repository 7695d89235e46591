"""PSI-AVA-VQA (Seenivasan et al., SurgicalGPT, 2023): `Train/` and `Val/`, each with one
question file per task, lines "<CASE>/<frame>.jpg|question|answer", and the keyframes
`keyframes/<CASE>/<frame>.jpg`. The tasks converted are those SurgicalGPT trains and
evaluates on: C1_location, C3_phase and C4_step; C2_action is left out, as there (its
answers are several actions at once). The split is the release's folder (Train, Val);
one keyframe in both is refused. Every answer is one label, so every record is closed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import CONVERTERS, Converter, Problems

SPLITS = {"train": "Train", "validation": "Val"}
TASKS = {"C1_location.txt": "location", "C3_phase.txt": "phase", "C4_step.txt": "step"}


@CONVERTERS.register("psi-ava-vqa")
class PsiAvaVqa(Converter):
    dataset = "PSI-AVA-VQA"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        self.require(root / "keyframes", "the keyframe folder keyframes/<CASE>/")
        for split, folder in SPLITS.items():
            for file, task in TASKS.items():
                source = self.require(
                    root / folder / file, f"PSI-AVA-VQA's {split} {task} questions"
                )
                for number, _, (frame, question, answer) in self.question_answer_lines(
                    source, problems, fields=3
                ):
                    parts = Path(frame).parts
                    if len(parts) != 2 or ".." in parts or Path(frame).is_absolute():
                        problems.add(
                            source, f"line {number}: frame {frame!r} is not <CASE>/<frame>.jpg"
                        )
                        continue
                    image = f"keyframes/{frame}"
                    if not self.image_ok(root, image, problems, source, f"line {number}"):
                        continue
                    yield self.record(
                        f"psi-ava-vqa-{split}-{task}-{number}", image, question, answer,
                        dataset=self.dataset, split=split, modality="endoscopy",
                        answer_type="closed", question_type=task, language="en",
                        source_id=f"{folder}/{file}:{number}", case=parts[0],
                    )  # fmt: skip
