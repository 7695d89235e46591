"""OmniMedVQA (Hu et al., 2024): `QA_information/Open-access/<source dataset>.json` (one
list of questions per source dataset) and `Images/<source dataset>/...`. Fields used:
question_id, dataset, question_type, question, gt_answer (the right option's text),
option_A..option_D (C and D may be absent), image_path (relative to the release folder),
modality_type (one file spells it `modality`). OmniMedVQA is an evaluation benchmark:
every record is in the `test` split. Every question is multiple choice (closed); the
answer's letter is the option whose text equals gt_answer, and a question where none or
several do is counted, not guessed. The Restricted-access part names images that the
release does not ship, so only the Open-access part is converted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import CONVERTERS, Converter, Problems

LETTERS = "ABCD"
REQUIRED = ("question_id", "question", "gt_answer", "image_path", "option_A", "option_B")


@CONVERTERS.register("omnimedvqa")
class OmniMedVqa(Converter):
    dataset = "OmniMedVQA"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        folder = self.require(root / "QA_information" / "Open-access",
                              "the question files QA_information/Open-access/*.json")  # fmt: skip
        files = sorted(folder.glob("*.json"))
        if not files:
            self.require(folder / "<source dataset>.json", "one question file per source dataset")
        seen: set[str] = set()
        for source in files:
            for i, r in enumerate(self.read_json_list(source, "OmniMedVQA's JSON")):
                key = f"entry {i}"
                missing = [k for k in REQUIRED if not isinstance(r, dict) or r.get(k) in (None, "")]
                if missing:
                    problems.add(source, f"{key}: fields {missing} are missing")
                    continue
                qid = str(r["question_id"])
                if qid in seen:
                    problems.add(source, f"{key}: question_id {qid!r} appears twice")
                    continue
                choices = []
                for letter in LETTERS:
                    option = r.get(f"option_{letter}")
                    if option in (None, ""):
                        break
                    choices.append(str(option).strip())
                answer = str(r["gt_answer"]).strip()
                hits = [LETTERS[j] for j, c in enumerate(choices) if c == answer]
                if len(hits) != 1:
                    problems.add(source, f"{key}: gt_answer {answer!r} matches {len(hits)} options "
                                         f"of {choices}")  # fmt: skip
                    continue
                image = str(r["image_path"]).strip()
                if not self.image_ok(root, image, problems, source, key):
                    continue
                seen.add(qid)
                options = " ".join(f"{c}. {t}" for c, t in zip(LETTERS, choices, strict=False))
                yield self.record(
                    f"omnimedvqa-{qid}", image, f"{str(r['question']).strip()} Choices: {options}",
                    answer, dataset=self.dataset, split="test",
                    modality=r.get("modality_type") or r.get("modality"), answer_type="closed",
                    choices=choices, answer_choice=hits[0], question_type=r.get("question_type"),
                    language="en", source_id=qid, source_dataset=r.get("dataset", source.stem),
                )  # fmt: skip
