// The Python module attnkern._C: importing it loads this library, whose static initializers register
// the attnkern_ext ops with torch (see ops.cpp). It defines no Python functions of its own.
#include <Python.h>

static struct PyModuleDef attnkern_module = {PyModuleDef_HEAD_INIT, "_C", "attnkern's C++ operators", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&attnkern_module); }
