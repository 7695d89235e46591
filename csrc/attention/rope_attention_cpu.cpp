// CPU kernels of rope_attention_forward / rope_attention_backward: rope_nd on q and k, then
// ATen's CPU flash attention (which returns the log-sum-exp the backward needs) over the
// items of cu_seqlens, read on the host. The backward recomputes the rotated q and k,
// runs ATen's CPU flash backward with the saved out and lse, and turns dq and dk back with
// the inverse rotation (the gradients above are with respect to the rotated q and k).
//
// Consecutive items of one length go to ATen in one call as a batch [n, H, l, D] of
// strided views (a pack of same-size images is one call): ATen computes every batch entry
// exactly as it computes a lone item (its block sizes depend only on the length), so this
// changes the number of calls, not the numbers.
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "../rope/rope_nd.h"
#include "rope_attention.h"

namespace omnivmed {
namespace attention {
namespace {

// Items [first token, first + count * length) of one length, one after another.
struct ItemRun {
  int64_t first;
  int64_t count;
  int64_t length;
};

std::vector<ItemRun> item_runs(const std::vector<int64_t>& bounds) {
  std::vector<ItemRun> runs;
  for (size_t i = 1; i < bounds.size(); ++i) {
    const int64_t length = bounds[i] - bounds[i - 1];
    if (length == 0) continue;  // an empty item has no tokens to attend
    if (!runs.empty() && runs.back().length == length &&
        runs.back().first + runs.back().count * length == bounds[i - 1]) {
      ++runs.back().count;
    } else {
      runs.push_back({bounds[i - 1], 1, length});
    }
  }
  return runs;
}

// [L, H, D] rows of a run -> [n, H, l, D] (a view of a contiguous tensor).
at::Tensor heads_first(const at::Tensor& x, const ItemRun& run) {
  return x.narrow(0, run.first, run.count * run.length)
      .view({run.count, run.length, x.size(1), x.size(2)})
      .transpose(1, 2);
}

// [H, L] log-sum-exp columns of a run -> [n, H, l] (a view).
at::Tensor lse_of(const at::Tensor& lse, const ItemRun& run) {
  return lse.narrow(1, run.first, run.count * run.length)
      .view({lse.size(0), run.count, run.length})
      .transpose(0, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_in, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale) {
  check_rope_attention_args("rope_attention_forward", q, k, v_in, positions, cu_seqlens,
                            max_seqlen, sections, theta);
  const std::vector<int64_t> bounds =
      item_bounds("rope_attention_forward", cu_seqlens, q.size(0), max_seqlen);
  // Nothing below is differentiated: the op's autograd is registered on the op itself.
  const at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor rq = rope::rope_nd_cpu_unchecked(q, positions, sections, theta, false);
  const at::Tensor rk = rope::rope_nd_cpu_unchecked(k, positions, sections, theta, false);
  const at::Tensor v = v_in.contiguous();
  const double scale = resolve_scale(softmax_scale, q.size(2));
  // The items cover every token (checked above), so every element gets written.
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  for (const ItemRun& run : item_runs(bounds)) {
    const auto [o, run_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        heads_first(rq, run), heads_first(rk, run), heads_first(v, run), 0.0, false,
        std::nullopt, scale);
    heads_first(out, run).copy_(o);
    lse_of(lse, run).copy_(run_lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale) {
  check_rope_attention_args("rope_attention_backward", q, k, v_in, positions, cu_seqlens,
                            max_seqlen, sections, theta);
  check_rope_attention_backward_args("rope_attention_backward", grad_in, q, out_in, lse_in);
  const std::vector<int64_t> bounds =
      item_bounds("rope_attention_backward", cu_seqlens, q.size(0), max_seqlen);
  const at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor rq = rope::rope_nd_cpu_unchecked(q, positions, sections, theta, false);
  const at::Tensor rk = rope::rope_nd_cpu_unchecked(k, positions, sections, theta, false);
  const at::Tensor v = v_in.contiguous(), grad = grad_in.contiguous(), out = out_in.contiguous(),
                   lse = lse_in.contiguous();
  const double scale = resolve_scale(softmax_scale, q.size(2));
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(q.sizes(), options),
             dv = at::empty(q.sizes(), options);
  for (const ItemRun& run : item_runs(bounds)) {
    const auto [run_dq, run_dk, run_dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        heads_first(grad, run), heads_first(rq, run), heads_first(rk, run), heads_first(v, run),
        heads_first(out, run), lse_of(lse, run).contiguous(), 0.0, false, std::nullopt, scale);
    heads_first(dq, run).copy_(run_dq);
    heads_first(dk, run).copy_(run_dk);
    heads_first(dv, run).copy_(run_dv);
  }
  // dq and dk above are with respect to the rotated q and k: turn them back.
  return {rope::rope_nd_cpu_unchecked(dq, positions, sections, theta, true),
          rope::rope_nd_cpu_unchecked(dk, positions, sections, theta, true), dv};
}

TORCH_LIBRARY_IMPL(omnivmed, CPU, m) {
  m.impl("rope_attention_forward", &rope_attention_forward_cpu);
  m.impl("rope_attention_backward", &rope_attention_backward_cpu);
}

}  // namespace attention
}  // namespace omnivmed
