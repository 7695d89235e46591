"""omnivmed-serve: an OpenAI-compatible server for a saved model.

    omnivmed-serve runs/demo/stage3/final --port 8000 --media-root /data/scans --api-key KEY

Then any OpenAI client: base_url http://HOST:PORT/v1. Content parts: `image_url`,
`video_url` and `volume_url` (a NIfTI file or a DICOM folder under --media-root, or a
data URL of a .nii.gz or of a zip of DICOM files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="a folder exported by omnivmed-train")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--media-root", help="media paths in requests resolve here, and only here")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--served-model-name", default="omnivmed")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=1024, help="completion tokens per request"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=16384)
    parser.add_argument("--max-concurrent", type=int, default=64)
    parser.add_argument("--max-request-mb", type=float, default=64)
    parser.add_argument("--max-media-mb", type=float, default=48)
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from ..inference import load_for_inference
        from ..serving.app import ServeSettings, create_app

        if args.media_root and not Path(args.media_root).is_dir():
            raise ValueError(f"--media-root {args.media_root} is not a folder")
        for flag in ("max_batch_size", "max_tokens", "max_prompt_tokens", "max_concurrent"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        model, tokenizer, options = load_for_inference(args.model, device=args.device)
        settings = ServeSettings(
            model_name=args.served_model_name, media_root=Path(args.media_root) if args.media_root else None,
            api_key=args.api_key, max_request_bytes=int(args.max_request_mb * 2**20),
            max_media_bytes=int(args.max_media_mb * 2**20), max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens, max_concurrent=args.max_concurrent,
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        )  # fmt: skip
        app = create_app(model, tokenizer, options, settings)
    except (ValueError, OSError, ImportError) as exc:
        print(f"omnivmed-serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
