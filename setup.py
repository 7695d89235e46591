"""Build of omnivmed_ext._C: CPU kernels always, CUDA kernels whenever possible.

CUDA is built when torch is a CUDA build and a CUDA toolkit is found. Environment knobs:

- ``OMNIVMED_FORCE_CPU=1``: build the CPU library only.
- ``OMNIVMED_FORCE_CUDA=1``: fail instead of falling back to CPU-only.
- ``TORCH_CUDA_ARCH_LIST``: architectures, e.g. ``"8.0;9.0"`` (the default) or ``"9.0+PTX"``.
- ``OMNIVMED_PTXAS_VERBOSE=1``: print ptxas' resource report (registers, spills).
- ``MAX_JOBS``: parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
BUILD_AUX = ROOT / "build" / "omnivmed_aux"
DEFAULT_ARCHS = "8.0;9.0+PTX"  # PTX: newer GPUs JIT-compile the sm_90 code


def _log(message: str) -> None:
    print(f"[omnivmed build] {message}", file=sys.stderr)


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> Path | None:
    """Locate the real CUDA toolkit.

    ``nvcc`` on PATH may be a wrapper script living outside the toolkit (torch would then
    guess CUDA_HOME from the wrapper's folder). ``nvcc --dryrun`` prints the toolkit root
    it really uses as ``#$ TOP=...``, which is reliable for wrappers and symlinks alike.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and _is_toolkit(Path(value)):
            return Path(value).resolve()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return default.resolve() if _is_toolkit(default) else None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "probe.cu").write_text("")
        try:
            proc = subprocess.run(
                [nvcc, "--dryrun", "-c", "probe.cu"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _log(f"could not run {nvcc} --dryrun: {exc}")
            return None
    for line in (proc.stdout + proc.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            top = Path(match.group(1).strip()).resolve()
            if _is_toolkit(top):
                return top
    candidate = Path(nvcc).resolve().parent.parent
    return candidate if _is_toolkit(candidate) else None


def pip_cuda_include_dirs() -> list[Path]:
    """Include folders of the CUDA libraries that torch's CUDA wheels install (pip package
    ``nvidia``), newest layout first."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    found = []
    for base in map(Path, getattr(nvidia, "__path__", [])):
        found += sorted(base.glob("cu*/include"), reverse=True)
        found += sorted(base.glob("*/include"))
    return [d for d in found if d.is_dir()]


def make_header_shim(toolkit: Path) -> Path | None:
    """ATen's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers that a bare toolkit may
    lack. Link just the missing headers from the pip ``nvidia`` package into a private
    folder, so no toolkit header is ever shadowed by another version."""
    toolkit_inc = toolkit / "include"
    needed = ("cublas_v2.h", "cusparse.h", "cublasLt.h", "cusolverDn.h")
    if all((toolkit_inc / h).exists() for h in needed):
        return None
    shim = BUILD_AUX / "cuda_header_shim"
    if shim.exists():
        shutil.rmtree(shim)
    shim.mkdir(parents=True)
    for inc in pip_cuda_include_dirs():
        for header in inc.iterdir():
            if header.is_file() and not (toolkit_inc / header.name).exists():
                target = shim / header.name
                if not target.exists():
                    target.symlink_to(header)
    missing = [h for h in needed if not (toolkit_inc / h).exists() and not (shim / h).exists()]
    if missing:
        _log(f"warning: headers {missing} are in neither {toolkit_inc} nor the pip nvidia package")
    return shim


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its CPU work on OpenMP. at::parallel_for is a header
    template whose `#pragma omp parallel` is compiled into the extension: without the flag
    every CPU kernel of ours ran on one thread whatever torch.get_num_threads() said."""
    import torch

    if sys.platform.startswith("linux") and torch._C.has_openmp:
        return ["-fopenmp"]
    return []


def parse_arch_list(spec: str) -> tuple[list[str], list[str]]:
    """'8.0;9.0+PTX' -> (-gencode flags, normalised names)."""
    flags, names = [], []
    for raw in re.split(r"[;\s,]+", spec.strip()):
        if not raw:
            continue
        ptx = raw.endswith("+PTX")
        arch = raw[: -len("+PTX")] if ptx else raw
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not match:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: cannot parse architecture {raw!r} in {spec!r}")
        if int(match.group(1)) < 8:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST: {raw!r} is older than 8.0; the fused kernels use "
                "sm_80 instructions (cp.async, bf16 mma). Build for 8.0 or newer, or set "
                "OMNIVMED_FORCE_CPU=1."
            )
        num = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        names.append(raw)
    if not flags:
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={spec!r} names no architecture")
    return flags, names


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def decide_cuda() -> Path | None:
    import torch

    if _truthy("OMNIVMED_FORCE_CPU"):
        _log("OMNIVMED_FORCE_CPU set: building the CPU library only")
        return None
    reason = None
    toolkit = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        toolkit = find_cuda_toolkit()
        if toolkit is None:
            reason = "no CUDA toolkit (nvcc) was found"
    if reason is not None:
        if _truthy("OMNIVMED_FORCE_CUDA"):
            raise SystemExit(f"OMNIVMED_FORCE_CUDA is set but {reason}")
        _log(f"{reason}: building the CPU library only")
        return None
    return toolkit


def write_build_config(with_cuda: bool, arch_names: list[str]) -> Path:
    inc = BUILD_AUX / "generated"
    inc.mkdir(parents=True, exist_ok=True)
    (inc / "omnivmed_build_config.h").write_text(
        f'#pragma once\n#define OMNIVMED_CUDA_ARCHS "{";".join(arch_names) if with_cuda else ""}"\n'
    )
    return inc


def extension_modules() -> tuple[list, dict]:
    toolkit = decide_cuda()
    if toolkit is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = str(toolkit)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if "tests" not in p.parts
    )
    cxx_flags = ["-O3", *openmp_flags()]
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    arch_names: list[str] = []
    if toolkit is not None:
        arch_flags, arch_names = parse_arch_list(
            os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        )
        _log(f"CUDA toolkit {toolkit}; architectures {';'.join(arch_names)}")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
        define_macros.append(("OMNIVMED_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DOMNIVMED_WITH_CUDA"]
        nvcc_flags += arch_flags
        if _truthy("OMNIVMED_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
        shim = make_header_shim(toolkit)
        if shim is not None:
            # The shim holds only headers the toolkit lacks, so its place in the search
            # order cannot shadow anything.
            include_dirs.append(str(shim))
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext_cls = CUDAExtension
    else:
        extra = {"cxx": cxx_flags}
        ext_cls = CppExtension
    include_dirs.append(str(write_build_config(toolkit is not None, arch_names)))
    ext = ext_cls(
        name="omnivmed_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=openmp_flags(),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=[*find_packages(where="python"), "omnivmed_ext"],
    package_dir={"omnivmed": "python/omnivmed", "omnivmed_ext": "omnivmed_ext"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
