"""The compiled library: how it was built, and the errors when it or a backend is missing."""

import json

import pytest
import torch

import omnivmed_ext
from omnivmed.cli import info
from omnivmed_ext import _library


def test_library_is_loaded_and_ops_registered():
    assert omnivmed_ext.library_loaded()
    assert hasattr(torch.ops.omnivmed, "rope_nd")


def test_cuda_build_matches_torch():
    # A CUDA build of torch with the toolkit present must give CUDA kernels, for the
    # default architectures unless TORCH_CUDA_ARCH_LIST said otherwise at build time.
    if omnivmed_ext.built_with_cuda():
        assert torch.version.cuda is not None
        assert len(omnivmed_ext.cuda_archs()) >= 1
    else:
        assert omnivmed_ext.cuda_archs() == ()


def test_missing_library_error(monkeypatch):
    monkeypatch.setattr(_library, "_compiled", None)
    monkeypatch.setattr(_library, "_IMPORT_ERROR", ImportError("no _C"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        omnivmed_ext.rope_nd(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.int32), [2])


def test_cuda_tensors_on_cpu_only_build_error(monkeypatch):
    class CpuOnly:
        with_cuda = 0
        cuda_archs = ""

    monkeypatch.setattr(_library, "_compiled", CpuOnly)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _library.require_library("rope_nd", torch.device("cuda"))


def test_info_cli_reports_build(capsys):
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["library_loaded"] is True
    assert "rope_nd" in report["ops"]
