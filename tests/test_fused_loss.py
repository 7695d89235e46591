"""The loss computed from the LLM's hidden states (fused on CUDA) equals the LLM's own."""

from __future__ import annotations

import pytest
import torch

from omnivmed.models import build_preset, modeling
from omnivmed.models.loss import (
    IGNORE_INDEX,
    fused_cross_entropy,
    fused_cross_entropy_applies,
    plain_linear_cross_entropy,
)


def batch(vocab: int, device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 23), generator=g)
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a prompt
    labels[0, 12:15] = IGNORE_INDEX  # the next packed sample's prompt
    position_ids = torch.cat([torch.arange(12), torch.arange(11)]).unsqueeze(0)
    return {k: v.to(device) for k, v in dict(input_ids=ids, labels=labels, position_ids=position_ids).items()}  # fmt: skip


def loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_loss_from_hidden_states_matches_the_llm_loss(monkeypatch):
    """On CPU the fused path's plumbing runs with the plain loss in the kernel's place."""
    torch.manual_seed(0)
    model, _ = build_preset("tiny")
    inputs = batch(model.config.text_config.vocab_size)
    want_loss, want_grads = loss_and_grads(model, inputs)
    assert not fused_cross_entropy_applies(torch.device("cpu"))
    monkeypatch.setattr(modeling, "fused_cross_entropy_applies", lambda device: True)
    monkeypatch.setattr(modeling, "fused_linear_cross_entropy", plain_linear_cross_entropy)
    got_loss, got_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


def test_the_switch_turns_the_fused_loss_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with fused_cross_entropy(False):
        assert not fused_cross_entropy_applies(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_loss_matches_the_plain_loss():
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    model, _ = build_preset("tiny")
    model = model.cuda()
    inputs = batch(model.config.text_config.vocab_size, "cuda")
    assert fused_cross_entropy_applies(torch.device("cuda"))
    fused_loss, fused_grads = loss_and_grads(model, inputs)
    with fused_cross_entropy(False):
        plain_loss, plain_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-4, rtol=1e-4)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
