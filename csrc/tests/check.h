// A minimal assertion helper for the C++ unit tests (no test framework dependency).
#pragma once

#include <cstdio>
#include <cstdlib>

static int g_failures = 0;

#define OMNIVMED_EXPECT(cond, ...)                                            \
  do {                                                                        \
    if (!(cond)) {                                                            \
      ++g_failures;                                                           \
      std::fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                      \
      std::fprintf(stderr, "\n");                                             \
    }                                                                         \
  } while (0)

inline int finish(const char* name) {
  if (g_failures == 0) {
    std::printf("%s: all checks passed\n", name);
    return EXIT_SUCCESS;
  }
  std::fprintf(stderr, "%s: %d checks failed\n", name, g_failures);
  return EXIT_FAILURE;
}
