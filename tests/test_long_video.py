"""Long videos in bounded memory: reading a 30-minute video takes no more memory than
reading a 1-minute one at the same settings (frames are sampled and decoded in chunks,
so peak memory follows the frame cap, not the length). Each read runs in a fresh process
and reports its peak resident memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("decord")

_READ = """
import json, resource, sys
from omnivmed.models import build_preset
from omnivmed.models.kinds import VisualKind
from omnivmed.processing.processor import Media, OmniVMedProcessor, ProcessorOptions
model, tok = build_preset("tiny")
options = ProcessorOptions(max_pixels=64 * 64, min_pixels=32 * 32, video_fps=1.0, max_video_frames=32)
processor = OmniVMedProcessor(model.config, tok, options)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch = processor.encode_media([Media(VisualKind.VIDEO, sys.argv[1])])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "peak_kib": after, "tokens": int(sum(batch.token_counts))}))
"""


def write_video(path: Path, minutes: float, fps: int = 4, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        base = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        for i in range(int(minutes * 60 * fps)):
            frame = base.copy()
            frame[(i * 3) % size, :, :] = 255  # a moving line, so frames differ
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def peak(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _READ, str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    short, long = tmp_path / "1min.mp4", tmp_path / "30min.mp4"
    write_video(short, 1)
    write_video(long, 30)
    assert long.stat().st_size > 10 * short.stat().st_size
    a, b = peak(short), peak(long)
    grown_a, grown_b = a["peak_kib"] - a["before_kib"], b["peak_kib"] - b["before_kib"]
    # Same frame cap, same tokens; the read's own peak within 20% + 16 MiB of the short one's.
    assert a["tokens"] > 0 and b["tokens"] > 0
    assert grown_b <= 1.2 * grown_a + 16 * 1024, (a, b)
