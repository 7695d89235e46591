"""The LLM's varlen attention on packed rows: equal to attention over each sample alone.

`varlen_attn` has CUDA kernels only, so the CPU tests put a per-sample SDPA stand-in in
its place (in both of the signatures torch releases have had) and let the function take
its CUDA path on CPU tensors; the CUDA test compares the real kernel with SDPA."""

from __future__ import annotations

import functools
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from omnivmed.models import llm_attention
from omnivmed.models.llm_attention import VARLEN, packed_offsets, varlen_attention_forward

LENGTHS = (5, 3, 7)


def _per_item(query, key, value, cu, scale, groups_ok):
    outs = []
    for a, b in pairwise(cu.tolist()):
        q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=groups_ok
            ).transpose(0, 1)
        )
    return torch.cat(outs)


def new_style_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    assert tuple(window_size) == (-1, 0), "the LLM's attention must be causal"
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    assert max_q == max_k == int(torch.diff(cu_seq_q).max())
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return _per_item(query, key, value, cu_seq_q, scale, enable_gqa)


def old_style_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, is_causal=False):  # fmt: skip
    assert is_causal and key.shape[1] == query.shape[1]  # no GQA: heads repeated before
    return _per_item(query, key, value, cu_seq_q, scale, False)


@pytest.fixture(params=[new_style_varlen, old_style_varlen], ids=["window_size", "is_causal"])
def cpu_varlen(request, monkeypatch):
    """The varlen path on CPU tensors, the kernel replaced by a per-sample stand-in."""
    from torch.nn.attention import varlen

    calls = []

    @functools.wraps(request.param)  # keeps the signature the function reads
    def counting(*args, **kwargs):
        calls.append(args[3])
        return request.param(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counting)
    monkeypatch.setattr(llm_attention, "varlen_supported", lambda device, dtype: True)
    return calls


def packed_positions(lengths=LENGTHS) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


class _Heads(torch.nn.Module):
    num_key_value_groups = 2
    training = False


def test_packed_row_equals_attention_per_sample(cpu_varlen):
    torch.manual_seed(0)
    total, hq, hkv, d = sum(LENGTHS), 4, 2, 16
    q = torch.randn(1, hq, total, d, dtype=torch.float64)
    k, v = (torch.randn(1, hkv, total, d, dtype=torch.float64) for _ in range(2))
    pos = packed_positions()
    out, weights = varlen_attention_forward(_Heads(), q, k, v, None, scaling=0.3, position_ids=pos)
    assert weights is None and out.shape == (1, total, hq, d)
    start = 0
    for n in LENGTHS:
        sl = slice(start, start + n)
        ref = F.scaled_dot_product_attention(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], is_causal=True, scale=0.3, enable_gqa=True
        )
        torch.testing.assert_close(out[0, sl], ref[0].transpose(0, 1))
        start += n
    assert len(cpu_varlen) == 1


def test_offsets_are_found_once_per_position_tensor():
    pos = packed_positions()
    cu, longest = packed_offsets(pos, 1)
    assert cu.tolist() == [0, 5, 8, 15] and cu.dtype == torch.int32 and longest == 7
    assert packed_offsets(pos, 1) is packed_offsets(pos, 1)  # every layer after the first
    # Two rows of unpacked positions: each row is one sample.
    cu2, longest2 = packed_offsets(torch.arange(6).unsqueeze(0), 2)
    assert cu2.tolist() == [0, 6, 12] and longest2 == 6
    pos.add_(0)  # modified in place: found again
    assert packed_offsets(pos, 1)[0] is not cu


def tiny_qwen2(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def test_whole_qwen2_on_a_packed_row_matches_samples_alone(cpu_varlen):
    packed_model, plain_model = tiny_qwen2(VARLEN), tiny_qwen2("sdpa")
    plain_model.load_state_dict(packed_model.state_dict())
    assert packed_model.config._attn_implementation == VARLEN
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 97, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(samples).unsqueeze(0)
    labels = ids.clone()
    out = packed_model(
        input_ids=ids, position_ids=packed_positions(), labels=labels, use_cache=False
    )
    assert len(cpu_varlen) == packed_model.config.num_hidden_layers
    assert all(c is cpu_varlen[0] for c in cpu_varlen)  # offsets computed once per forward
    start = 0
    for s in samples:
        alone = plain_model(input_ids=s.unsqueeze(0), use_cache=False).logits
        torch.testing.assert_close(
            out.logits[0, start : start + len(s)], alone[0], atol=1e-5, rtol=1e-4
        )
        start += len(s)
    out.loss.backward()  # the packed path trains
    assert packed_model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_padding_and_generation_take_the_sdpa_path(cpu_varlen):
    model, plain = tiny_qwen2(VARLEN), tiny_qwen2("sdpa")
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    want = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_varlen_runs_on_cuda_in_half_precision_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert llm_attention.varlen_supported(cuda, torch.bfloat16)
    assert llm_attention.varlen_supported(cuda, torch.float16)
    assert not llm_attention.varlen_supported(cuda, torch.float32)
    assert not llm_attention.varlen_supported(cpu, torch.bfloat16)


def test_default_is_varlen_on_cuda_without_flash_attn(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert llm_attention.default_llm_attention() == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert llm_attention.default_llm_attention() == VARLEN


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_varlen_matches_sdpa_per_sample_forward_and_backward():
    torch.manual_seed(0)
    lengths = (129, 7, 300, 64)
    total, hq, hkv, d = sum(lengths), 12, 2, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, hq, total, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (
        torch.randn(1, hkv, total, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2)
    )
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(dev)
    out, _ = varlen_attention_forward(_Heads(), q, k, v, None, scaling=d**-0.5, position_ids=pos)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    refs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        refs.append(
            F.scaled_dot_product_attention(
                q[..., sl, :].float(), k[..., sl, :].float(), v[..., sl, :].float(),
                is_causal=True, enable_gqa=True,
            )[0].transpose(0, 1)
        )  # fmt: skip
        start += n
    ref = torch.cat(refs).unsqueeze(0)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_whole_qwen2_on_a_packed_row_matches_samples_alone():
    packed_model = tiny_qwen2(VARLEN).cuda().bfloat16()
    plain_model = tiny_qwen2("sdpa").cuda().bfloat16()
    plain_model.load_state_dict(packed_model.state_dict())
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 97, (n,), generator=g).cuda() for n in (40, 3, 77)]
    ids = torch.cat(samples).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in samples]).unsqueeze(0).cuda()
    out = packed_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    start = 0
    for s in samples:
        alone = plain_model(input_ids=s.unsqueeze(0), use_cache=False).logits
        torch.testing.assert_close(
            out[0, start : start + len(s)].float(), alone[0].float(), atol=3e-2, rtol=3e-2
        )
        start += len(s)
