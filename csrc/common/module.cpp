// The Python module omnivmed_ext._C. Importing it runs the static op registrations; it
// also reports how the library was built, so Python can say clearly when a backend is
// missing instead of failing inside the dispatcher.
#include <Python.h>

#if __has_include("omnivmed_build_config.h")
#include "omnivmed_build_config.h"
#endif
#ifndef OMNIVMED_CUDA_ARCHS
#define OMNIVMED_CUDA_ARCHS ""
#endif

extern "C" {

static struct PyModuleDef omnivmed_module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of omnivmed (ops live in torch.ops.omnivmed).",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&omnivmed_module);
  if (module == nullptr) return nullptr;
#ifdef OMNIVMED_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", OMNIVMED_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
