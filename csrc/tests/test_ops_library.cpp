// The op library on its own, as a C++ user gets it: libomnivmed_ops.so is loaded at run
// time (no Python, nothing of it linked in), every schema of the omnivmed namespace must
// have a CPU kernel (or be one of the CUDA-only backends), and each op, called through the
// dispatcher on the CPU, must match a small reference written here with at:: ops.
//
// Usage: test_ops_library /path/to/libomnivmed_ops.so
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "check.h"

namespace {

using Tensor = at::Tensor;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The ops that run on CUDA only (the fused kernels under their own names).
const std::set<std::string> kCudaOnly = {"omnivmed::_rope_attention_fused_forward",
                                         "omnivmed::_rope_attention_fused_backward"};

const std::vector<std::string> kDeclared = {
    "omnivmed::rope_nd",
    "omnivmed::rope_attention",
    "omnivmed::rope_attention_forward",
    "omnivmed::rope_attention_backward",
    "omnivmed::_rope_attention_fused_forward",
    "omnivmed::_rope_attention_fused_backward",
    "omnivmed::l1_prune",
    "omnivmed::l1_prune_padded",
};

c10::OperatorHandle op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
}

bool throws_with(const std::string& needle, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const bool found = std::string(e.what()).find(needle) != std::string::npos;
    if (!found) std::fprintf(stderr, "  (message was: %.300s)\n", e.what());
    return found;
  }
  return false;
}

double max_error(const Tensor& a, const Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// ---- references ----------------------------------------------------------------------

// rope_nd by its definition, in double with at:: ops (differentiable).
Tensor reference_rope(const Tensor& x, const Tensor& positions,
                      const std::vector<int64_t>& sections, double theta, bool inverse = false) {
  const int64_t half = x.size(2) / 2;
  std::vector<Tensor> angles;
  for (size_t a = 0; a < sections.size(); ++a) {
    if (sections[a] == 0) continue;
    const Tensor j = at::arange(sections[a], at::kDouble);
    const Tensor inv_freq = at::pow(theta, -j / static_cast<double>(sections[a]));
    angles.push_back(positions.select(1, static_cast<int64_t>(a)).to(at::kDouble).unsqueeze(1) *
                     inv_freq.unsqueeze(0));
  }
  Tensor angle = at::cat(angles, 1).unsqueeze(1);  // [L, 1, D/2]
  if (inverse) angle = -angle;
  const Tensor xd = x.to(at::kDouble);
  const Tensor x1 = xd.narrow(2, 0, half), x2 = xd.narrow(2, half, half);
  return at::cat({x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()}, 2);
}

// Attention inside each item on rotated q and k, in double: (out, lse [H, L]).
Tensors2 reference_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& positions, const std::vector<int64_t>& bounds,
                             const std::vector<int64_t>& sections, double scale) {
  const Tensor rq = reference_rope(q, positions, sections, 1e4);
  const Tensor rk = reference_rope(k, positions, sections, 1e4);
  const Tensor vd = v.to(at::kDouble);
  std::vector<Tensor> outs, lses;
  for (size_t i = 1; i < bounds.size(); ++i) {
    const int64_t a = bounds[i - 1], n = bounds[i] - bounds[i - 1];
    if (n == 0) continue;
    // [H, l, D] per item
    const Tensor qi = rq.narrow(0, a, n).transpose(0, 1), ki = rk.narrow(0, a, n).transpose(0, 1);
    const Tensor scores = at::matmul(qi, ki.transpose(1, 2)) * scale;
    outs.push_back(at::matmul(at::softmax(scores, -1), vd.narrow(0, a, n).transpose(0, 1))
                       .transpose(0, 1));
    lses.push_back(at::logsumexp(scores, -1));
  }
  return {at::cat(outs, 0), at::cat(lses, 1)};
}

// ---- the library alone ---------------------------------------------------------------

void every_schema_has_a_cpu_kernel() {
  std::set<std::string> found;
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("omnivmed::", 0) != 0) continue;
    found.insert(name.name);
    const auto handle = c10::Dispatcher::singleton().findOp(name);
    OMNIVMED_EXPECT(handle.has_value(), "%s has no handle", name.name.c_str());
    if (!handle || kCudaOnly.count(name.name)) continue;
    const bool cpu = handle->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
                     handle->hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd);
    OMNIVMED_EXPECT(cpu, "%s is declared but has no CPU kernel", name.name.c_str());
  }
  for (const std::string& name : kDeclared) {
    OMNIVMED_EXPECT(found.count(name) == 1, "%s is not declared", name.c_str());
  }
  OMNIVMED_EXPECT(found.size() == kDeclared.size(), "%zu ops declared, %zu expected",
                  found.size(), kDeclared.size());
}

void rope_nd_matches_reference() {
  const auto rope =
      op("omnivmed::rope_nd")
          .typed<Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, double, bool)>();
  const std::vector<int64_t> sections = {4, 16, 16};
  const Tensor x = at::randn({37, 3, 72});
  const Tensor pos = at::randint(-5, 300, {37, 3}, at::kInt);
  const Tensor out = rope.call(x, pos, sections, 1e4, false);
  OMNIVMED_EXPECT(max_error(out, reference_rope(x, pos, sections, 1e4)) < 1e-4, "rope_nd forward");
  const Tensor back = rope.call(out, pos, sections, 1e4, true);
  OMNIVMED_EXPECT(max_error(back, x) < 1e-4, "rope_nd inverse");
}

void l1_prune_matches_reference() {
  using Signature = Tensors5(const Tensor&, const Tensor&, int64_t, int64_t, double,
                             std::string, int64_t, int64_t);
  const auto prune = op("omnivmed::l1_prune").typed<Signature>();
  const auto padded =
      op("omnivmed::l1_prune_padded")
          .typed<Tensors6(const Tensor&, const Tensor&, int64_t, int64_t, double,
                          std::string, int64_t, int64_t)>();
  // Two items (3 and 4 frames) of a 3 x 4 grid of 12-value uint8 patches; frames repeat
  // their predecessor with a few patches changed, so both decisions occur.
  const int64_t gh = 3, gw = 4, n = gh * gw, p = 12, frames = 7;
  Tensor patches = at::randint(0, 256, {frames, n, p}, at::kByte);
  for (int64_t f : {1, 2, 4, 5, 6}) {
    patches[f].copy_(patches[f - 1]);
    patches[f][f % n].copy_(at::randint(0, 256, {p}, at::kByte));
    patches[f][(3 * f) % n].add_(1);  // mean difference 1: below the threshold
  }
  const Tensor cu_frames = at::tensor(std::vector<int32_t>{0, 3, 7});
  const double threshold = 10.0;
  const auto [keep, index, positions, cu_seqlens, values] =
      prune.call(patches, cu_frames, gh, gw, threshold, "previous", 1, 0);
  // The rule by its definition: the first frame of an item whole; later patches iff the
  // mean |difference| to the previous frame's patch is >= threshold (exact for uint8).
  const Tensor diff = (patches.narrow(0, 1, frames - 1).to(at::kLong) -
                       patches.narrow(0, 0, frames - 1).to(at::kLong))
                          .abs()
                          .sum(-1);
  Tensor want = at::ones({frames, n}, at::kBool);
  std::vector<int64_t> want_index, want_t, want_cu = {0};
  for (int64_t f = 0; f < frames; ++f) {
    const bool first = f == 0 || f == 3;
    const int64_t item_start = f < 3 ? 0 : 3;
    for (int64_t i = 0; i < n; ++i) {
      const bool kept = first || diff[f - 1][i].item<int64_t>() >= threshold * p;
      want[f][i] = kept;
      if (kept) {
        want_index.push_back(f * n + i);
        want_t.push_back(f - item_start);
      }
    }
    if (f == 2 || f == 6) want_cu.push_back(static_cast<int64_t>(want_index.size()));
  }
  OMNIVMED_EXPECT(at::equal(keep, want), "l1_prune keep mask");
  const Tensor want_idx = at::tensor(want_index, at::kLong);
  OMNIVMED_EXPECT(at::equal(index, want_idx), "l1_prune index");
  const Tensor want_pos = at::stack({at::tensor(want_t, at::kLong),
                                     want_idx.remainder(n).div(gw, "floor"),
                                     want_idx.remainder(gw)},
                                    1);
  OMNIVMED_EXPECT(at::equal(positions.to(at::kLong), want_pos), "l1_prune positions");
  OMNIVMED_EXPECT(at::equal(cu_seqlens.to(at::kLong), at::tensor(want_cu, at::kLong)),
                  "l1_prune cu_seqlens");
  OMNIVMED_EXPECT(at::equal(values, patches.reshape({frames * n, p}).index_select(0, want_idx)),
                  "l1_prune values");
  const auto [pkeep, pindex, ppositions, pcu, pvalues, count] =
      padded.call(patches, cu_frames, gh, gw, threshold, "previous", 1, 0);
  const int64_t kept = count.item<int64_t>();
  OMNIVMED_EXPECT(kept == want_idx.size(0) && pindex.size(0) == frames * n, "padded count %ld",
                  static_cast<long>(kept));
  OMNIVMED_EXPECT(at::equal(pkeep, keep) && at::equal(pindex.narrow(0, 0, kept), index) &&
                      at::equal(pcu, cu_seqlens),
                  "l1_prune_padded differs from l1_prune");
}

using ForwardSignature = Tensors2(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, int64_t, c10::IntArrayRef, double,
                                  std::optional<double>);
using BackwardSignature = Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   int64_t, c10::IntArrayRef, double, std::optional<double>);

void rope_attention_matches_reference(at::ScalarType dtype, double tolerance) {
  const auto forward = op("omnivmed::rope_attention_forward").typed<ForwardSignature>();
  const auto backward = op("omnivmed::rope_attention_backward").typed<BackwardSignature>();
  const auto out_only =
      op("omnivmed::rope_attention")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        int64_t, c10::IntArrayRef, double, std::optional<double>)>();
  // Empty items, a one-token item, and a run of equal lengths (one batched ATen call).
  const std::vector<int64_t> bounds = {0, 0, 5, 6, 39, 72, 105, 105, 150};
  const int64_t total = bounds.back(), heads = 3, head_dim = 72;
  const std::vector<int64_t> sections = {9, 13, 14};
  const double scale = 0.2;
  std::vector<int32_t> cu(bounds.begin(), bounds.end());
  const Tensor cu_seqlens = at::tensor(cu);
  const Tensor positions = at::randint(0, 64, {total, 3}, at::kInt);
  const Tensor q = at::randn({total, heads, head_dim}).to(dtype);
  const Tensor k = at::randn({total, heads, head_dim}).to(dtype);
  const Tensor v = at::randn({total, heads, head_dim}).to(dtype);
  const Tensor grad = at::randn({total, heads, head_dim}).to(dtype);

  const auto [out, lse] = forward.call(q, k, v, positions, cu_seqlens, 45, sections, 1e4, scale);
  // Reference with autograd in double, for the gradients too.
  const Tensor qd = q.to(at::kDouble).requires_grad_(), kd = k.to(at::kDouble).requires_grad_(),
               vd = v.to(at::kDouble).requires_grad_();
  const auto [want_out, want_lse] =
      reference_attention(qd, kd, vd, positions, bounds, sections, scale);
  const char* name = c10::toString(dtype);
  OMNIVMED_EXPECT(out.scalar_type() == dtype && lse.scalar_type() == at::kFloat &&
                      lse.sizes() == at::IntArrayRef({heads, total}),
                  "%s: forward output types/shapes", name);
  OMNIVMED_EXPECT(max_error(out, want_out) < tolerance, "%s: out off by %g", name,
                  max_error(out, want_out));
  OMNIVMED_EXPECT(max_error(lse, want_lse) < tolerance, "%s: lse off by %g", name,
                  max_error(lse, want_lse));
  const Tensor out_alone = out_only.call(q, k, v, positions, cu_seqlens, 45, sections, 1e4, scale);
  OMNIVMED_EXPECT(at::equal(out_alone, out),
                  "%s: rope_attention differs from rope_attention_forward's out", name);

  want_out.backward(grad.to(at::kDouble));
  const auto [dq, dk, dv] =
      backward.call(grad, q, k, v, out, lse, positions, cu_seqlens, 45, sections, 1e4, scale);
  for (const auto& [got, want, which] :
       {std::tuple{dq, qd.grad(), "dq"}, std::tuple{dk, kd.grad(), "dk"},
        std::tuple{dv, vd.grad(), "dv"}}) {
    OMNIVMED_EXPECT(got.scalar_type() == dtype && got.sizes() == q.sizes(), "%s: %s type/shape",
                    name, which);
    OMNIVMED_EXPECT(max_error(got, want) < 2 * tolerance, "%s: %s off by %g", name, which,
                    max_error(got, want));
  }
}

void rope_attention_rejects_bad_input() {
  const auto forward = op("omnivmed::rope_attention_forward").typed<ForwardSignature>();
  const Tensor q = at::randn({8, 2, 64}), pos = at::zeros({8, 3}, at::kInt);
  const std::vector<int64_t> sections = {8, 12, 12};
  const Tensor cu = at::tensor(std::vector<int32_t>{0, 4, 8});
  OMNIVMED_EXPECT(throws_with("cu_seqlens must start at 0, never decrease and end at L = 8", [&] {
                    forward.call(q, q, q, pos, at::tensor(std::vector<int32_t>{0, 4, 7}), 4,
                                 sections, 1e4, std::nullopt);
                  }),
                  "bad offsets accepted");
  OMNIVMED_EXPECT(throws_with("an item has 4 tokens but max_seqlen = 3", [&] {
                    forward.call(q, q, q, pos, cu, 3, sections, 1e4, std::nullopt);
                  }),
                  "too small max_seqlen accepted");
  const Tensor h = at::randn({8, 2, 48});
  OMNIVMED_EXPECT(throws_with("head dim 48 is not supported", [&] {
                    forward.call(h, h, h, pos, cu, 4, {6, 9, 9}, 1e4, std::nullopt);
                  }),
                  "head dim 48 accepted");
  OMNIVMED_EXPECT(throws_with("share one dtype", [&] {
                    forward.call(q, q.to(at::kDouble), q, pos, cu, 4, sections, 1e4, std::nullopt);
                  }),
                  "mixed dtypes accepted");
}

void cuda_only_ops_fail_clearly_on_cpu() {
  const Tensor q = at::randn({8, 2, 64}).to(at::kHalf), pos = at::zeros({8, 3}, at::kInt);
  const Tensor cu = at::tensor(std::vector<int32_t>{0, 8});
  const auto fused = op("omnivmed::_rope_attention_fused_forward").typed<ForwardSignature>();
  OMNIVMED_EXPECT(throws_with("Could not run 'omnivmed::_rope_attention_fused_forward' with "
                              "arguments from the 'CPU' backend",
                              [&] {
                                fused.call(q, q, q, pos, cu, 8, {8, 12, 12}, 1e4, std::nullopt);
                              }),
                  "the fused forward ran on the CPU");
  const auto fused_backward =
      op("omnivmed::_rope_attention_fused_backward").typed<BackwardSignature>();
  const Tensor lse = at::zeros({2, 8});
  OMNIVMED_EXPECT(throws_with("Could not run 'omnivmed::_rope_attention_fused_backward' with "
                              "arguments from the 'CPU' backend",
                              [&] {
                                fused_backward.call(q, q, q, q, q, lse, pos, cu, 8, {8, 12, 12},
                                                    1e4, std::nullopt);
                              }),
                  "the fused backward ran on the CPU");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s /path/to/libomnivmed_ops.so\n", argv[0]);
    return EXIT_FAILURE;
  }
  OMNIVMED_EXPECT(!c10::Dispatcher::singleton().findSchema({"omnivmed::rope_nd", ""}).has_value(),
                  "omnivmed ops exist before the library is loaded");
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return EXIT_FAILURE;
  }
  at::manual_seed(11);
  every_schema_has_a_cpu_kernel();
  rope_nd_matches_reference();
  l1_prune_matches_reference();
  rope_attention_matches_reference(at::kFloat, 1e-4);
  rope_attention_matches_reference(at::kBFloat16, 6e-2);
  rope_attention_rejects_bad_input();
  cuda_only_ops_fail_clearly_on_cpu();
  return finish("test_ops_library");
}
