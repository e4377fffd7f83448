// fastbert._C as a Python module: a plain CPython module (no pybind11). Importing it loads the
// library, which registers the embedding ops (embedding.cpp); its functions describe the build,
// switch the CUDA id check and key Triton launches (launch_key.cpp).
#include <Python.h>

#include "embedding.h"

namespace fastbert {
PyObject* launch_key(PyObject*, PyObject* args);
}  // namespace fastbert

#define FASTBERT_STR2(x) #x
#define FASTBERT_STR(x) FASTBERT_STR2(x)
#ifdef FASTBERT_CUDA_ARCHS
#define FASTBERT_ARCHS_STRING FASTBERT_STR(FASTBERT_CUDA_ARCHS)  // e.g. "80_90"
#else
#define FASTBERT_ARCHS_STRING ""
#endif

static PyObject* py_cuda_built(PyObject*, PyObject*) { return PyBool_FromLong(fastbert::cuda_built()); }
static PyObject* py_cuda_archs(PyObject*, PyObject*) { return PyUnicode_FromString(FASTBERT_ARCHS_STRING); }
static PyObject* py_set_sync_id_check(PyObject*, PyObject* on) {
  const int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  const bool previous = fastbert::sync_id_check();
  fastbert::sync_id_check() = value != 0;
  return PyBool_FromLong(previous);
}

static PyMethodDef fastbert_methods[] = {
    {"cuda_built", py_cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_archs", py_cuda_archs, METH_NOARGS, "Compute capabilities compiled, e.g. '80_90' (empty without CUDA)."},
    {"set_sync_id_check", py_set_sync_id_check, METH_O,
     "This thread's CUDA id check on (True) or off (False); returns the previous setting."},
    {"launch_key", fastbert::launch_key, METH_O,
     "What a Triton kernel compiled for these launch arguments depends on (bytes), or None."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef fastbert_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastbert's C++/CUDA extension: the fused embedding ops live in torch.ops.fastbert",
                                      -1, fastbert_methods};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&fastbert_module); }
