// Makes the shared library importable as the Python module nad_ext._C. The operators
// themselves are registered with the dispatcher when the library loads; this file is the only
// one the LibTorch (CMake) build leaves out.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "nad-ext native operators (torch.ops.nad.*)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
