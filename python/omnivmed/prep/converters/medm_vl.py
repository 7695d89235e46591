"""MedM-VL's own record format (its examples/data/*_2d.json and *_3d.json): JSON lists of
{id, conversations: [{from: human|gpt, value}], image: [paths] (2D) or image3d: [.npy
paths] (3D), and optionally domain, task, data_source}. An inference record ends with its
human turn and gives the reference in `answer`. Every `*.json` in the input folder is
read; media paths are relative to it (put the files in the folder MedM-VL's --image_dir /
--image3d_dir name).

Training records (ending in a gpt turn) go to split `train`; inference records to `test`,
with their answer added as the gpt turn. `data_source` becomes `dataset` (else the file's
name), `task` the question type. MedM-VL's 3D arrays hold Hounsfield units that it clips
to [-1000, 1000] and scales linearly, so volumes carry that as a CT window (level 0,
width 2000). A 3D record may mark its volumes with <image> or <image3d>; the count of
markers must equal the count of media."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...models.kinds import VisualKind
from . import CONVERTERS, ConversionError, Converter, Problems

MEDM_VL_VOLUMES = {"intensity": "ct_window", "ct_window": [0.0, 2000.0]}
_MARKERS = re.compile("<image3d>|<image>")  # MedM-VL's own markers, 3D first


@CONVERTERS.register("medm-vl")
class MedMVl(Converter):
    dataset = "MedM-VL"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        files = sorted(root.glob("*.json"))
        if not files:
            raise ConversionError(f"{root}: no *.json files: expected MedM-VL record lists")
        seen: set[str] = set()
        for source in files:
            for i, r in enumerate(self.read_json_list(source, "MedM-VL's JSON")):
                rec = self._convert(r, root, source, f"entry {i}", problems)
                if rec is None:
                    continue
                if rec["id"] in seen:
                    problems.add(source, f"entry {i}: id {rec['source_id']!r} appears twice")
                    continue
                seen.add(rec["id"])
                yield rec

    def _convert(
        self, r: Any, root: Path, source: Path, key: str, problems: Problems
    ) -> dict | None:
        turns = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
            for t in turns
        ):  # fmt: skip
            problems.add(source, f"{key}: expected conversations of human/gpt turns")
            return None
        turns = [{"from": t["from"], "value": t["value"]} for t in turns]
        media = {}
        for field in ("image", "image3d"):
            value = r.get(field) or []
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                problems.add(
                    source, f"{key}: {field!r} must be a path or a list of paths, got {value!r}"
                )
                return None
            media[field] = value
        images, volumes = media["image"], media["image3d"]
        if images and volumes:
            problems.add(source, f"{key}: has both image and image3d")
            return None
        markers = [m for t in turns for m in _MARKERS.findall(t["value"])]
        if len(markers) != len(images) + len(volumes):
            problems.add(
                source, f"{key}: {len(markers)} markers for {len(images) + len(volumes)} media"
            )
            return None
        # MedM-VL may mark volumes with its image marker: in a record of volumes every marker
        # is a volume's. (An image record marked as a volume is left for the record checks.)
        if volumes:
            for t in turns:
                t["value"] = _MARKERS.sub(VisualKind.VOLUME.marker, t["value"])
        if not all(self.image_ok(root, p, problems, source, key) for p in images + volumes):
            return None
        if turns[-1]["from"] == "gpt":
            split, answer = "train", turns[-1]["value"]
        elif isinstance(r.get("answer"), str) and r["answer"].strip():
            split, answer = "test", r["answer"].strip()
            turns.append({"from": "gpt", "value": answer})
        else:
            problems.add(source, f"{key}: ends with a human turn but has no answer")
            return None
        sample = str(r.get("id", key))
        rec: dict[str, Any] = {"id": f"medm-vl-{source.stem}-{sample}"}
        if images:
            rec["images"] = images
        if volumes:
            rec["volumes"] = [{"path": p, **MEDM_VL_VOLUMES} for p in volumes]
        rec.update(conversations=turns, answer=answer, split=split, source_id=sample)
        fields = dict(dataset=r.get("data_source") or source.stem, question_type=r.get("task"),
                      domain=r.get("domain"))  # fmt: skip
        rec.update({k: str(v) for k, v in fields.items() if v is not None})
        return rec
