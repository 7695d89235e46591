"""Loading of the compiled library and clear errors when it, or a backend, is missing."""

from __future__ import annotations

from types import ModuleType

import torch

try:
    from omnivmed_ext import _C as _compiled  # noqa: N811
except ImportError as exc:  # not built, or built against another torch
    _compiled: ModuleType | None = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation .` from the source tree, after torch is "
    "installed (see the README)."
)


def library_loaded() -> bool:
    """True when omnivmed_ext._C imported and its ops are registered."""
    return _compiled is not None


def built_with_cuda() -> bool:
    """True when the compiled library holds CUDA kernels."""
    return _compiled is not None and bool(_compiled.with_cuda)


def cuda_archs() -> tuple[str, ...]:
    """The CUDA architectures the library was compiled for (empty for a CPU-only build)."""
    if _compiled is None or not _compiled.cuda_archs:
        return ()
    return tuple(_compiled.cuda_archs.split(";"))


def require_library(op: str, device: torch.device | None = None) -> None:
    """Raise a clear error if `op` cannot run on `device` with the library as built."""
    if _compiled is None:
        raise RuntimeError(
            f"omnivmed_ext.{op}: the compiled library omnivmed_ext._C could not be imported "
            f"({_IMPORT_ERROR}). {_BUILD_HINT}"
        )
    if device is not None and device.type == "cuda" and not _compiled.with_cuda:
        raise RuntimeError(
            f"omnivmed_ext.{op}: got CUDA tensors, but omnivmed_ext._C was built without CUDA "
            f"kernels (torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}). "
            "Reinstall with a CUDA build of torch and the CUDA toolkit (nvcc) present."
        )
