// Every op schema of the omnivmed namespace, in one place. Backends add their kernels
// with TORCH_LIBRARY_IMPL next to the kernels themselves.
#include <torch/library.h>

TORCH_LIBRARY(omnivmed, m) {
  // Multi-axis rotary embedding over [L, H, D] (see csrc/rope/rope_math.h for the layout).
  m.def(
      "rope_nd(Tensor x, Tensor positions, int[] sections, float theta=10000.0, "
      "bool inverse=False) -> Tensor");
}
