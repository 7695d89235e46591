"""omnivmed-infer: answer questions about one image, volume (NIfTI, DICOM series folder,
.npy) or video with a saved model.

    omnivmed-infer omnivmed-demo/stage3/final --volume ct_series/ -q "Which organ is shown?"
    omnivmed-infer MODEL --video clip.mp4 -q "What is shown?" -q "Is there bleeding?" --json

Media are read with the processor settings saved next to the model (processor_config.json,
written by omnivmed-train); the flags below override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..models.kinds import VisualKind
from ..processing.errors import MediaError
from ..processing.intensity import INTENSITY_MODES
from ..processing.prompt import refuse_markers

# Flags that override a saved media setting of the same name.
_MEDIA_FLAGS = ("max_pixels", "min_pixels", "max_slices", "max_visual_tokens", "video_fps",
                "video_frames", "max_video_frames", "ct_window", "intensity", "prune_threshold",
                "max_sequence_length")  # fmt: skip


def _options(args, saved):
    overrides = {k: getattr(args, k) for k in _MEDIA_FLAGS if getattr(args, k) is not None}
    if args.no_prune:
        overrides["prune"] = False
    if args.true_positions:
        overrides["true_positions"] = True
    return saved.replace(**overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="a folder saved by save_pretrained (e.g. <run>/stage3/final)")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="an image file (PNG, JPEG, TIFF, ...)")
    media.add_argument("--volume", help="a NIfTI file, a DICOM series folder or a .npy/.npz volume")
    media.add_argument("--video", help="a video file or a folder of frames")
    parser.add_argument("-q", "--question", action="append", required=True,
                        help="a question (repeat for several; the medium is read once)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--no-prune", action="store_true", help="keep every visual token")
    parser.add_argument("--prune-threshold", type=float, help="L1 pruning threshold")
    parser.add_argument("--max-pixels", type=int, help="pixel budget per frame")
    parser.add_argument("--min-pixels", type=int)
    parser.add_argument("--max-slices", type=int, help="slices kept from a volume")
    parser.add_argument("--max-visual-tokens", type=int, help="cap on visual tokens after pruning")
    parser.add_argument("--video-fps", type=float, help="frames sampled per second")
    parser.add_argument("--video-frames", type=int, help="frames sampled in all (instead of fps)")
    parser.add_argument("--max-video-frames", type=int)
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument("--ct-window", help="CT window name (e.g. abdomen, lung, bone, brain)")
    parser.add_argument("--intensity", choices=INTENSITY_MODES,
                        help="how volume values reach 0..1 (none: already 0..1; uint8: 0..255 grey levels)")  # fmt: skip
    parser.add_argument("--true-positions", action="store_true",
                        help="t from frame times / slice positions instead of indices")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")

    from ..inference import answer_questions, load_for_inference

    kind, path = next((k, p) for k, p in ((VisualKind.IMAGE, args.image), (VisualKind.VOLUME, args.volume),
                                          (VisualKind.VIDEO, args.video)) if p is not None)  # fmt: skip
    try:
        for question in args.question:  # the medium comes from its flag, never from the text
            refuse_markers(question, f"-q {question!r}")
        start = time.perf_counter()
        model, processor = load_for_inference(args.model, args.device, args.dtype)
        loaded = time.perf_counter() - start
        processor = processor.with_options(_options(args, processor.options))
        answers = answer_questions(model, processor, kind, path, args.question,
                                   args.max_new_tokens)  # fmt: skip
    except MediaError as exc:  # names the file; the flag says what it was given as
        print(f"omnivmed-infer: --{kind.name.lower()} {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"omnivmed-infer: {exc}", file=sys.stderr)
        return 2
    device = str(next(model.parameters()).device)
    if args.json:
        report = {"model": args.model, "media": {"kind": kind.name.lower(), "path": path},
                  "device": device, "load_seconds": loaded,
                  "answers": [dataclasses.asdict(a) for a in answers]}  # fmt: skip
        print(json.dumps(report, indent=2))
        return 0
    first = answers[0]
    print(f"{kind.name.lower()} {Path(path).name}: {first.visual_tokens} visual tokens "
          f"({first.visual_tokens_unpruned} without pruning); model on {device}")  # fmt: skip
    for a in answers:
        print(f"Q: {a.question}\nA: {a.text}  [{a.seconds:.2f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
