"""`omnivmed-info`: how the installed package was built and what it can run here."""

from __future__ import annotations

import argparse
import json
import platform

import torch

import omnivmed
import omnivmed_ext


def registered_ops() -> list[str]:
    """Every op of the omnivmed namespace (torch.ops lists only those already looked up)."""
    prefix = "omnivmed::"
    return sorted(
        name.removeprefix(prefix)
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(prefix)
    )


def registered_parts() -> dict[str, list[str]]:
    """The names a model config may use for each kind of part."""
    from omnivmed.models import CONNECTORS, ENCODERS, VOLUME_STRATEGIES

    return {
        "vision_encoders": ENCODERS.names(),
        "connectors": CONNECTORS.names(),
        "volume_strategies": VOLUME_STRATEGIES.names(),
    }


def build_report() -> dict:
    return {
        "omnivmed": omnivmed.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "library_loaded": omnivmed_ext.library_loaded(),
        "built_with_cuda": omnivmed_ext.built_with_cuda(),
        "cuda_archs": list(omnivmed_ext.cuda_archs()),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": registered_ops() if omnivmed_ext.library_loaded() else [],
        **registered_parts(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnivmed-info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = build_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0 if report["library_loaded"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
