"""Cholec80-VQA (Seenivasan et al., Surgical-VQA, 2022): per-frame question files
`Classification/<video>/<frame>_QA.txt` (one "question|answer" per line; the frame is the
part of the name before the first "_") and the frames `cropped_image/<video>/<frame>.png`
(the release's code says `cropped_image`, its documentation `cropped_images`; either is
read). Frame names are frame numbers of the 25 fps Cholec80 videos; as the release's own
loader, only frames whose number is a multiple of 100 are used (one every 4 s). Split by
video, as Surgical-VQA trains and validates: validation 5, 11, 12, 17, 19, 26, 27, 31;
train the other videos of 1-40. Every answer is one label (phase, yes/no, tool count), so
every record is closed; question types come from the question templates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import CONVERTERS, Converter, Problems

VALIDATION = (5, 11, 12, 17, 19, 26, 27, 31)
TRAIN = tuple(v for v in range(1, 41) if v not in VALIDATION)
FRAME_STEP = 100  # the release's loader keeps frames whose number is a multiple of this


def question_type(question: str) -> str | None:
    q = question.lower().strip()
    if q.startswith("how many"):
        return "count"
    if "phase" in q:
        return "phase"
    if q.startswith(("is ", "are ")):
        return "tool"
    return None


@CONVERTERS.register("cholec80-vqa")
class Cholec80Vqa(Converter):
    dataset = "Cholec80-VQA"
    splits: ClassVar[dict[str, tuple[int, ...]]] = {"train": TRAIN, "validation": VALIDATION}

    def records(self, root: Path, problems: Problems) -> Iterator[dict[str, Any]]:
        frames = self.one_of_folders(root, ("cropped_image", "cropped_images"), "the frames")
        for split, videos in self.splits.items():
            for video in videos:
                folder = self.require(
                    root / "Classification" / str(video), f"the question files of video {video}"
                )
                for qa_file in sorted(folder.glob("*.txt")):
                    frame = qa_file.stem.split("_")[0]
                    if not frame.isdigit():
                        problems.add(qa_file, "not named <frame number>_QA.txt")
                        continue
                    if int(frame) % FRAME_STEP:
                        problems.leave_out(f"frame number not a multiple of {FRAME_STEP}")
                        continue
                    image = f"{frames}/{video}/{frame}.png"
                    if not self.image_ok(root, image, problems, qa_file, "frame"):
                        continue
                    for number, index, (question, answer) in self.question_answer_lines(
                        qa_file, problems
                    ):
                        yield self.record(
                            f"cholec80-vqa-{video}-{qa_file.stem}-{index}", image, question, answer,
                            dataset=self.dataset, split=split, modality="endoscopy",
                            answer_type="closed", question_type=question_type(question),
                            language="en", source_id=f"{video}/{qa_file.name}:{number}",
                        )  # fmt: skip
