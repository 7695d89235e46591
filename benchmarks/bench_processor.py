"""Processor throughput: samples per second through a DataLoader, pruning on vs off, on
volumes (the MNI152 T1 template that ships with nilearn) and generated videos.

    python benchmarks/bench_processor.py [--samples 24] [--workers 0 2]

Reports samples/s and visual tokens per sample for each setting; the ratio of tokens shows
how much encoder and LLM work pruning removes downstream.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import print_table, write_results
from torch.utils.data import DataLoader

import omnivmed
from omnivmed.data import InstructionDataset, VisualCollator
from omnivmed.processing.processor import OmniVMedProcessor, ProcessorOptions


def make_data(root: Path, samples: int) -> Path:
    import av
    import nilearn.datasets

    mni = (
        Path(nilearn.datasets.__file__).parent
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    shutil.copy(mni, root / "mni.nii.gz")
    rng = np.random.default_rng(0)
    with av.open(str(root / "scope.mp4"), "w") as container:  # a slowly moving endoscope view
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        base = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
        for k in range(80):
            frame = np.roll(base, k // 8, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    records = []
    for i in range(samples):
        if i % 2:
            records.append({"id": f"v{i}", "videos": ["scope.mp4"],
                            "conversations": [{"from": "human", "value": "<video> what?"}, {"from": "gpt", "value": "a polyp"}]})  # fmt: skip
        else:
            records.append({"id": f"m{i}", "volumes": ["mni.nii.gz"],
                            "conversations": [{"from": "human", "value": "<image3d> what?"}, {"from": "gpt", "value": "T1"}]})  # fmt: skip
    path = root / "bench.json"
    path.write_text(json.dumps(records))
    return path


def run(data: Path, prune: bool, workers: int, model, tok) -> dict:
    proc = OmniVMedProcessor(
        model.config, tok, ProcessorOptions(max_pixels=224 * 224, max_slices=32, video_fps=4.0)
    )
    dataset = InstructionDataset(data, proc, prune=prune)
    loader = DataLoader(
        dataset, batch_size=2, num_workers=workers, collate_fn=VisualCollator(tok.pad_token_id)
    )
    tokens, n = 0, 0
    start = time.perf_counter()
    for batch in loader:
        tokens += batch["pixel_values"].shape[0]
        n += len(batch["ids"])
    elapsed = time.perf_counter() - start
    return {"prune": prune, "workers": workers, "samples": n, "seconds": elapsed,
            "samples_per_s": n / elapsed, "visual_tokens_per_sample": tokens / n}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = omnivmed.build_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.samples)
        rows = [run(data, prune, w, model, tok) for w in args.workers for prune in (False, True)]
    print_table(rows, [("prune", "prune", ""), ("workers", "workers", "d"), ("samples_per_s", "samples/s", ".2f"),
                       ("visual_tokens_per_sample", "tokens/sample", ".0f")])  # fmt: skip
    if not args.no_save:
        print(f"wrote {write_results('processor', torch.device('cpu'), rows)}")


if __name__ == "__main__":
    main()
