"""M3D-VQA (Bai et al., 2024): `M3D_VQA_{train,val,test}.csv` with columns Image Path,
Text, Question Type, Question, Choice A..D, Answer, Answer Choice, and the `.npy` volumes
the paths name (relative to the input folder). Every row gives two records: the
multiple-choice question (closed; choices and the answer's letter) and the same question
open-ended (the answer text), as M3D evaluates both. Question types 1..5 are Plane, Phase,
Organ, Abnormality, Location. Splits are by volume. M3D's arrays are already scaled to
[0, 1], so the volumes carry `intensity: none` (checked, never re-normalised)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...models.kinds import VisualKind
from . import CONVERTERS, Converter, Problems

SPLITS = ("train", "val", "test")
M3D_ARRAYS = {"intensity": "none"}  # M3D's .npy volumes are already in [0, 1]
TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}
COLUMNS = ("Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
           "Choice D", "Answer", "Answer Choice")  # fmt: skip


@CONVERTERS.register("m3d-vqa")
class M3DVqa(Converter):
    dataset = "M3D-VQA"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        for split in SPLITS:
            source = self.require(root / f"M3D_VQA_{split}.csv", f"M3D-VQA's {split} table")
            for i, key, r in self.read_csv_rows(source, COLUMNS):
                volume = r["Image Path"].strip()
                if not self.image_ok(root, volume, problems, source, key):
                    continue
                letter = r["Answer Choice"].strip().upper()
                choices = [r[f"Choice {c}"].strip() for c in "ABCD"]
                if letter not in "ABCD" or not letter:
                    problems.add(source, f"{key}: Answer Choice {letter!r} is not A-D")
                    continue
                qtype = TYPES.get(r["Question Type"].strip(), r["Question Type"].strip())
                common = dict(dataset=self.dataset, split=split, modality="CT", question_type=qtype,
                              language="en", source_id=f"{split}/{i}")  # fmt: skip
                options = " ".join(f"{c}. {t}" for c, t in zip("ABCD", choices, strict=True))
                yield self.record(
                    f"m3d-vqa-{split}-{i}-closed", volume, f"{r['Question'].strip()} Choices: {options}",
                    f"{letter}. {choices['ABCD'.index(letter)]}", kind=VisualKind.VOLUME,
                    media_options=M3D_ARRAYS, answer_type="closed", choices=choices, answer_choice=letter, **common,
                )  # fmt: skip
                yield self.record(
                    f"m3d-vqa-{split}-{i}-open", volume, r["Question"].strip(), r["Answer"].strip(),
                    kind=VisualKind.VOLUME, media_options=M3D_ARRAYS,
                    answer_type="open", **common,
                )  # fmt: skip
