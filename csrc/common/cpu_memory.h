// Large fresh CPU outputs backed by transparent huge pages. glibc serves big allocations
// with a fresh mmap, so writing them costs one page fault per 4 KiB page; for a
// memory-bound op that can take longer than the op itself (measured here: 22 ms of faults
// vs about 6 ms of work for a 75 MB output; 14 ms to fill a fresh 15 MB buffer, 0.6 ms
// with huge pages). With huge pages it is one fault per 2 MiB. A refusal (THP disabled,
// non-Linux) simply leaves the default behaviour.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace omnivmed {

constexpr size_t kHugePage = size_t{2} << 20;

// Advises the whole 2 MiB pages inside [ptr, ptr + bytes) (for buffers allocated elsewhere).
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t{16} << 20;
  if (ptr == nullptr || bytes < kMinBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// A new contiguous CPU tensor whose memory is 2 MiB-aligned and advised for huge pages as
// a whole (at most one partly used huge page of overhead), for outputs of 2 MiB or more;
// smaller ones, or where the allocation fails, come from at::empty.
inline at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHugePage && options.device().is_cpu()) {
    const size_t rounded = (bytes + kHugePage - 1) & ~(kHugePage - 1);
    if (void* ptr = std::aligned_alloc(kHugePage, rounded)) {
      madvise(ptr, rounded, MADV_HUGEPAGE);
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace omnivmed
