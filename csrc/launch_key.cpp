// fastbert._C.launch_key: what a Triton kernel compiled for some launch arguments depends on,
// for kernels/_launcher.py, which launches eagerly through the compiled kernels it has kept.
// Two bytes per positional argument, at least as fine as Triton's own specialization:
//   tensor: 0x40 | dtype, then its address modulo 16 (Triton specializes on 16-byte alignment);
//   int:    0x02, then bit 0: == 1, bit 1: divisible by 16, bits 2-3: width (0: i32, 1: i64,
//           2: u64, 3: beyond);
//   bool 0x01, float 0x03, None 0x04, each then 0.
// Anything else (a tensor without storage, a tensor descriptor, a tuple) gives None: that
// launch goes through Triton.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace fastbert {

namespace {

// Bits 2-3 and the divisibility of a Python int that does not fit a signed 64-bit integer.
unsigned char wide_int(PyObject* a, int overflow) {
  const unsigned long long low = PyLong_AsUnsignedLongLongMask(a);  // its value modulo 2^64
  unsigned char width = 3;
  if (overflow > 0) {
    const unsigned long long big = PyLong_AsUnsignedLongLong(a);
    if (big == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();  // at least 2^64
    } else {
      width = 2;
    }
  }
  return static_cast<unsigned char>((width << 2) | ((low % 16 == 0) << 1));
}

}  // namespace

PyObject* launch_key(PyObject*, PyObject* args) {
  if (!PyTuple_Check(args)) {
    PyErr_SetString(PyExc_TypeError, "launch_key takes a tuple of launch arguments");
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  std::string key(static_cast<size_t>(2 * n), '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* a = PyTuple_GET_ITEM(args, i);
    unsigned char kind = 0, detail = 0;
    if (THPVariable_Check(a)) {
      const at::Tensor& t = THPVariable_Unpack(a);
      if (!t.defined() || !t.has_storage()) Py_RETURN_NONE;
      kind = static_cast<unsigned char>(0x40 | static_cast<int>(t.scalar_type()));
      detail = static_cast<unsigned char>(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16);
    } else if (PyBool_Check(a)) {
      kind = 0x01;
    } else if (PyLong_CheckExact(a)) {
      kind = 0x02;
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
      if (v == -1 && PyErr_Occurred()) return nullptr;
      if (overflow != 0) {
        detail = wide_int(a, overflow);
        if (PyErr_Occurred()) return nullptr;
      } else {
        const bool narrow = v >= INT32_MIN && v <= INT32_MAX;
        detail = static_cast<unsigned char>((v == 1) | ((v % 16 == 0) << 1) | ((narrow ? 0 : 1) << 2));
      }
    } else if (PyFloat_CheckExact(a)) {
      kind = 0x03;
    } else if (a == Py_None) {
      kind = 0x04;
    } else {
      Py_RETURN_NONE;
    }
    key[2 * i] = static_cast<char>(kind);
    key[2 * i + 1] = static_cast<char>(detail);
  }
  return PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
}

}  // namespace fastbert
