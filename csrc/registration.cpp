// The only TORCH_LIBRARY of fastprune: every schema in one place. Implementations register
// themselves with TORCH_LIBRARY_IMPL in the file that defines them (woodbury/woodbury_cpu.cpp, ...).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastprune, m) {
  // In place, returning nothing: torch.compile cannot functionalise a custom op whose output aliases an
  // input (Tensor(a!) -> Tensor(a!)); the Python wrapper fastprune.ops.woodbury_update_ returns finv.
  // Per block b of the (nb, B, B) stack: F^-1 <- F^-1 - F^-1 G^T (N I + G F^-1 G^T)^-1 G F^-1, where G
  // is the (k, B) slice of grads (k, d) for block b, zero-padded past d. N = num_samples.
  m.def("woodbury_update_(Tensor(a!) finv, Tensor grads, float num_samples) -> ()");
  // Block-diagonal inverse of F = damp I + (1/N) sum_n g_n g_n^T for grads (N, d): (ceil(d/B), B, B).
  m.def("woodbury_inverse_fisher(Tensor grads, int block_size, float damp) -> Tensor");
}

// The shared object is a Python extension only so that `import fastprune._C` loads it; the ops are
// reached through torch.ops.fastprune.
static PyModuleDef fp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fp_module); }
