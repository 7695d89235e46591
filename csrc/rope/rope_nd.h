// Host-side entry points of the rope_nd op family.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace omnivmed {
namespace rope {

// Validates the arguments of rope_nd with messages that name the argument and what was
// expected. Shared by every backend so that CPU and CUDA reject the same inputs.
void check_rope_nd_args(const at::Tensor& x, const at::Tensor& positions,
                        c10::IntArrayRef sections, double theta);

at::Tensor rope_nd_cpu(const at::Tensor& x, const at::Tensor& positions,
                       c10::IntArrayRef sections, double theta, bool inverse);

// The same kernel for callers that already checked the arguments at their own boundary
// (rope_attention rotates q and k with it).
at::Tensor rope_nd_cpu_unchecked(const at::Tensor& x, const at::Tensor& positions,
                                 c10::IntArrayRef sections, double theta, bool inverse);

#ifdef OMNIVMED_WITH_CUDA
at::Tensor rope_nd_cuda(const at::Tensor& x, const at::Tensor& positions,
                        c10::IntArrayRef sections, double theta, bool inverse);
#endif

}  // namespace rope
}  // namespace omnivmed
