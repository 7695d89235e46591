"""PubMedVision (Chen et al., HuatuoGPT-Vision, 2024): `PubMedVision_Alignment_VQA.json`
(stage 1, alignment) and `PubMedVision_InstructionTuning_VQA.json` (stage 2, instruction
tuning), LLaVA-format lists of {id, image: [paths], conversations, modality, body_part},
with the images unpacked into `images/` (`unzip -j images_N.zip -d images/`). The
release's conversations do not mark where the images go: a conversation without markers
gets one `<image>` per image at the start of its first human turn; one that has markers
must have as many as images. Both files are training data (split `train`); answers are
free text, so no answer type is set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ...models.kinds import VisualKind
from . import CONVERTERS, Converter, Problems

_MARKER = re.compile(re.escape("<image>"))  # PubMedVision's own image marker


class _PubMedVision(Converter):
    file: ClassVar[str]

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        self.require(root / "images", "the image folder images/ (the zips unpacked)")
        source = self.require(root / self.file, f"{self.dataset}'s question file")
        seen: set[str] = set()
        for i, r in enumerate(self.read_json_list(source, "PubMedVision's JSON")):
            key = f"entry {i}"
            turns = r.get("conversations") if isinstance(r, dict) else None
            images = r.get("image") if isinstance(r, dict) else None
            images = [images] if isinstance(images, str) else images
            if not isinstance(turns, list) or len(turns) < 2 or not all(
                isinstance(t, dict) and t.get("from") in ("human", "gpt")
                and isinstance(t.get("value"), str) for t in turns
            ):  # fmt: skip
                problems.add(source, f"{key}: expected human/gpt conversations")
                continue
            if (
                not isinstance(images, list)
                or not images
                or not all(isinstance(p, str) for p in images)
            ):
                problems.add(source, f"{key}: 'image' must be a list of paths, got {images!r}")
                continue
            if turns[-1]["from"] != "gpt":
                problems.add(source, f"{key}: the conversation does not end with an answer")
                continue
            if not all(self.image_ok(root, p, problems, source, key) for p in images):
                continue
            ours = VisualKind.IMAGE.marker
            turns = [{"from": t["from"], "value": _MARKER.sub(ours, t["value"])} for t in turns]
            markers = sum(t["value"].count(ours) for t in turns)
            if markers == 0:
                first = next((t for t in turns if t["from"] == "human"), None)
                if first is None:
                    problems.add(source, f"{key}: no human turn")
                    continue
                first["value"] = f"{ours}\n" * len(images) + first["value"]
            elif markers != len(images):
                problems.add(source, f"{key}: {markers} image markers for {len(images)} images")
                continue
            answer = turns[-1]["value"]
            sample = str(r.get("id", i))
            if sample in seen:
                problems.add(source, f"{key}: id {sample!r} appears twice")
                continue
            seen.add(sample)
            rec: dict[str, Any] = {"id": f"{self.name}-{sample}", "images": list(images),
                                   "conversations": turns, "answer": answer}  # fmt: skip
            fields = dict(dataset=self.dataset, split="train", modality=r.get("modality"),
                          body_part=r.get("body_part"), language="en", source_id=sample)  # fmt: skip
            rec.update({k: v for k, v in fields.items() if v is not None})
            yield rec


@CONVERTERS.register("pubmedvision-alignment")
class PubMedVisionAlignment(_PubMedVision):
    dataset = "PubMedVision-Alignment"
    file = "PubMedVision_Alignment_VQA.json"
    expected_counts: ClassVar[dict[str, int]] = {"train": 647031}


@CONVERTERS.register("pubmedvision-instruct")
class PubMedVisionInstruct(_PubMedVision):
    dataset = "PubMedVision-Instruct"
    file = "PubMedVision_InstructionTuning_VQA.json"
    expected_counts: ClassVar[dict[str, int]] = {"train": 647031}
