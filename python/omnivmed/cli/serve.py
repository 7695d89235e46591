"""omnivmed-serve: an OpenAI-compatible server for a saved model.

    OMNIVMED_API_KEY=KEY omnivmed-serve omnivmed-demo/stage3/final --port 8000 --media-root /data/scans

Then any OpenAI client: base_url http://HOST:PORT/v1. Content parts: `image_url`,
`video_url` and `volume_url` (a NIfTI file or a DICOM folder under --media-root, or a
data URL of a .nii.gz or of a zip of DICOM files).

The API key (required on every /v1 route; the viewer page and /health are open) comes
from --api-key-file, or the OMNIVMED_API_KEY environment variable, or --api-key (which
other users of the machine can see in the process list).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

API_KEY_ENV = "OMNIVMED_API_KEY"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="a folder exported by omnivmed-train")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--media-root", help="media paths in requests resolve here, and only here")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in ps: "
                                          f"prefer --api-key-file or {API_KEY_ENV})")  # fmt: skip
    parser.add_argument("--api-key-file", help="read the API key from this file (its first line)")
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
    parser.add_argument("--max-media-parts", type=int, default=16, help="media parts per request")
    parser.add_argument("--max-media-per-message", type=int, default=8)
    parser.add_argument("--max-request-pixels", type=int, default=2**27,
                        help="pixels a request's media may decode to, every slice and frame "
                             "counted (default 2**27: a 32-frame 1080p video is 2**26)")  # fmt: skip
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client has to send a request's headers, and then its body")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import uvicorn

        from ..inference import load_for_inference
        from ..serving.app import ServeSettings, create_app
        from ..serving.connections import uvicorn_config

        if args.media_root and not Path(args.media_root).is_dir():
            raise ValueError(f"--media-root {args.media_root} is not a folder")
        for flag in ("max_batch_size", "max_tokens", "max_prompt_tokens", "max_concurrent",
                     "max_media_parts", "max_media_per_message", "max_request_pixels"):  # fmt: skip
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        if not args.read_timeout > 0:
            raise ValueError("--read-timeout must be a positive number of seconds")
        api_key = resolve_api_key(args.api_key, args.api_key_file)
        model, processor = load_for_inference(args.model, device=args.device)
        settings = ServeSettings(
            model_name=args.served_model_name, media_root=Path(args.media_root) if args.media_root else None,
            api_key=api_key, max_request_bytes=int(args.max_request_mb * 2**20),
            max_media_bytes=int(args.max_media_mb * 2**20), max_media_parts=args.max_media_parts,
            max_media_per_message=args.max_media_per_message, max_request_pixels=args.max_request_pixels,
            read_timeout=args.read_timeout, max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens, max_concurrent=args.max_concurrent,
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        )  # fmt: skip
        app = create_app(model, processor, settings)
        config = uvicorn_config(app, args.host, args.port, settings.read_timeout, log_level="info")
    except (ValueError, OSError, ImportError) as exc:
        print(f"omnivmed-serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(config).run()
    return 0


def resolve_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The key from --api-key-file, --api-key or the environment, in that order of
    precedence (the file and the flag together are an error); None: no key."""
    if flag is not None and key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {key_file}: cannot be read ({exc})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {key_file}: the first line is empty")
        return key
    if flag is not None:
        if not flag.strip():
            raise ValueError("--api-key is empty")
        return flag
    return os.environ.get(API_KEY_ENV) or None


if __name__ == "__main__":
    raise SystemExit(main())
