"""VQA-RAD (Lau et al., 2018), the OSF release: `VQA_RAD Dataset Public.json` and the
image folder `VQA_RAD Image Folder/`. Fields used: qid, image_name, question, answer,
answer_type (OPEN/CLOSED, the annotators'), question_type, image_organ, phrase_type. Split:
phrase_type "test_freeform" / "test_para" is the test set, "freeform" / "para" train (the
release's documentation). Test questions ask about images that also have train questions
(the release splits questions, not images), so images are shared across splits here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import CONVERTERS, ConversionError, Converter, Problems

JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"


@CONVERTERS.register("vqa-rad")
class VqaRad(Converter):
    dataset = "VQA-RAD"
    expected_counts: ClassVar[dict[str, int]] = {"test": 451}
    images_shared_across_splits = True

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        source = self.require(root / JSON_NAME, "the release's question file")
        self.require(root / IMAGE_DIR, "the release's image folder")
        rows = self.read_json_list(source, "the release's JSON")
        if not any(isinstance(r, dict) and "answer_type" in r for r in rows):
            raise ConversionError(
                f"{source}: no 'answer_type' field; this looks like a mirror that dropped the "
                "annotators' OPEN/CLOSED labels (use the OSF release: closed/open must not be "
                "guessed from the answers)"
            )
        for i, r in enumerate(rows):
            key = f"entry {i}"
            qa = self.open_closed_qa(r, source, key, problems, "qid", "image_name", "phrase_type")
            if qa is None:
                continue
            question, answer, answer_type, qid, image, phrase = qa
            if not self.image_ok(root, f"{IMAGE_DIR}/{image}", problems, source, key):
                continue
            split = "test" if str(phrase).startswith("test") else "train"
            yield self.record(
                f"vqa-rad-{qid}", f"{IMAGE_DIR}/{image}", question, answer,
                dataset=self.dataset, split=split, modality="radiology",
                answer_type=answer_type, question_type=str(r.get("question_type") or "") or None,
                organ=r.get("image_organ"), language="en", source_id=str(qid),
            )  # fmt: skip
