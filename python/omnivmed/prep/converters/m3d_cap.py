"""M3D-Cap (Bai et al., 2024): the split file `M3D_Cap_npy/M3D_Cap.json` (or `M3D_Cap.json`
at the top) with lists `train`, `validation` and `test` of {image: a `.npy` volume,
text: a `.txt` report}, both relative to the input folder (M3D's data root), as M3D's
caption dataset reads them. Every entry becomes a report-generation record: the volume,
a fixed request for the findings, and the report text as the answer (open). Splits are
by volume. The arrays are already scaled to [0, 1] (`intensity: none`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...models.kinds import VisualKind
from . import CONVERTERS, ConversionError, Converter, Problems, RefusedFileError
from .m3d_vqa import M3D_ARRAYS

SPLITS = ("train", "validation", "test")
PROMPT = "Describe the findings of this CT scan."


@CONVERTERS.register("m3d-cap")
class M3DCap(Converter):
    dataset = "M3D-Cap"

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        candidates = [root / "M3D_Cap_npy" / "M3D_Cap.json", root / "M3D_Cap.json"]
        source = next((c for c in candidates if c.is_file()), None)
        if source is None:
            raise ConversionError(f"{candidates[0]} is missing: expected M3D-Cap's split file "
                                  f"(or {candidates[1].name} in {root})")  # fmt: skip
        try:
            table = json.loads(self.read_text(source))
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{source}: not M3D-Cap's JSON ({exc})") from None
        missing = [
            s for s in SPLITS if not isinstance(table, dict) or not isinstance(table.get(s), list)
        ]
        if missing:
            raise ConversionError(f"{source}: expected lists {list(SPLITS)}; {missing} are missing")
        for split in SPLITS:
            for i, entry in enumerate(table[split]):
                key = f"{split} entry {i}"
                if not isinstance(entry, dict) or not all(
                    isinstance(entry.get(k), str) for k in ("image", "text")
                ):
                    problems.add(source, f"{key}: expected image and text paths")
                    continue
                volume = entry["image"]
                if not self.image_ok(root, volume, problems, source, key):
                    continue
                try:
                    report = self.read_text(root / entry["text"]).strip()
                except RefusedFileError as exc:
                    problems.refuse(source, f"{key}: report {exc}")
                    continue
                except ConversionError as exc:  # not UTF-8
                    problems.add(source, f"{key}: report {exc}")
                    continue
                except OSError as exc:
                    problems.add(source, f"{key}: report {entry['text']} is unreadable ({exc})")
                    continue
                if not report:
                    problems.add(source, f"{key}: report {entry['text']} is empty")
                    continue
                yield self.record(
                    f"m3d-cap-{split}-{i}", volume, PROMPT, report,
                    kind=VisualKind.VOLUME, media_options=M3D_ARRAYS, dataset=self.dataset,
                    split=split, modality="CT", answer_type="open", question_type="report",
                    language="en", source_id=f"{split}/{i}",
                )  # fmt: skip
