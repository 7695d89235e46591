// Portability macros shared by the CPU (.cpp) and CUDA (.cu) translation units, so
// that one header of math compiles for both.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OMNIVMED_HD __host__ __device__ __forceinline__
#define OMNIVMED_DEVICE_COMPILE 1
#else
#define OMNIVMED_HD inline
#define OMNIVMED_DEVICE_COMPILE 0
#endif
