"""A saved model folder, ready to answer: the model on its device and the processor that
was saved with it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..processing.processor import OmniVMedProcessor

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_inference(
    model_dir: str | Path, device: str = "auto", dtype: str = "auto"
) -> tuple[torch.nn.Module, OmniVMedProcessor]:
    """(model, processor) of a folder exported by `omnivmed-train` (or any
    `save_pretrained` folder of `OmniVMedForConditionalGeneration` with its tokenizer):
    the model in eval mode on `device`, the processor as saved beside it (a folder without
    a saved processor gets its tokenizer and media settings, or the default settings).

    `device`: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; `dtype`: "auto"
    (bfloat16 on a GPU that supports it, float32 otherwise), "float32", "bfloat16",
    "float16".
    """
    from ..models.loading import load_saved_model

    path = Path(model_dir)
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)  # fmt: skip
    if dtype == "auto":
        on_gpu = target.type == "cuda" and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if on_gpu else torch.float32
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here (use cpu or auto)")
    model = load_saved_model(path, dtype=torch_dtype)
    model.to(target).eval()
    return model, OmniVMedProcessor.from_pretrained(path, model.config)
