// The CPU kernel of rope_nd through ATen, against a plain double-precision loop, and its
// argument checks.
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "check.h"
#include "rope/rope_nd.h"

namespace {

// out[l, h, p] / out[l, h, p + D/2] by the definition, in double.
at::Tensor naive_rope(const at::Tensor& x, const at::Tensor& pos, const std::vector<int64_t>& sections,
                      double theta) {
  const auto xd = x.to(at::kDouble).contiguous();
  auto out = at::empty_like(xd);
  const int64_t L = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  auto xa = xd.accessor<double, 3>();
  auto oa = out.accessor<double, 3>();
  const auto pa = pos.to(at::kLong).contiguous();
  auto pp = pa.accessor<int64_t, 2>();
  for (int64_t l = 0; l < L; ++l) {
    int64_t pair = 0;
    for (size_t a = 0; a < sections.size(); ++a) {
      for (int64_t j = 0; j < sections[a]; ++j, ++pair) {
        const double angle =
            static_cast<double>(pp[l][a]) * std::pow(theta, -static_cast<double>(j) / sections[a]);
        for (int64_t h = 0; h < H; ++h) {
          const double x1 = xa[l][h][pair], x2 = xa[l][h][pair + half];
          oa[l][h][pair] = x1 * std::cos(angle) - x2 * std::sin(angle);
          oa[l][h][pair + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
        }
      }
    }
  }
  return out;
}

void matches_naive_loop() {
  at::manual_seed(7);
  const std::vector<std::vector<int64_t>> splits = {{36}, {4, 16, 16}, {1, 3, 20, 12}};
  for (const auto& sections : splits) {
    for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      const auto x = at::randn({97, 3, 72}).to(dtype);
      const auto pos = at::randint(-10, 700, {97, static_cast<int64_t>(sections.size())}, at::kInt);
      const auto out = omnivmed::rope::rope_nd_cpu(x, pos, sections, 10000.0, false);
      const double err = (out.to(at::kDouble) - naive_rope(x, pos, sections, 10000.0)).abs().max().item<double>();
      const double tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-4 : 5e-2;
      OMNIVMED_EXPECT(err < tol, "dtype %s axes %zu: max error %g", c10::toString(dtype),
                      sections.size(), err);
      const auto back = omnivmed::rope::rope_nd_cpu(out, pos, sections, 10000.0, true);
      const double round_trip = (back.to(at::kDouble) - x.to(at::kDouble)).abs().max().item<double>();
      OMNIVMED_EXPECT(round_trip < 2 * tol, "inverse round trip off by %g", round_trip);
    }
  }
}

bool throws_with(const std::string& needle, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

void rejects_bad_input() {
  const auto pos = at::zeros({4, 2}, at::kInt);
  OMNIVMED_EXPECT(throws_with("must be even", [&] {
    omnivmed::rope::rope_nd_cpu(at::randn({4, 2, 7}), pos, {2, 1}, 1e4, false);
  }), "odd head dim accepted");
  OMNIVMED_EXPECT(throws_with("must sum to D/2 = 4", [&] {
    omnivmed::rope::rope_nd_cpu(at::randn({4, 2, 8}), pos, {2, 3}, 1e4, false);
  }), "bad sections accepted");
  OMNIVMED_EXPECT(throws_with("int32 or int64", [&] {
    omnivmed::rope::rope_nd_cpu(at::randn({4, 2, 8}), at::zeros({4, 2}), {2, 2}, 1e4, false);
  }), "float positions accepted");
}

}  // namespace

int main() {
  matches_naive_loop();
  rejects_bad_input();
  return finish("test_rope_cpu");
}
