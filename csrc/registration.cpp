// The only TORCH_LIBRARY of fastprune: every schema in one place. Implementations register
// themselves with TORCH_LIBRARY_IMPL in the file that defines them (woodbury/woodbury_cpu.cpp,
// sparse/sparse_cpu.cpp, ...).
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
  // CSR packing of a 2-D weight (out, in), zeros dropped: (row_ptr int32 (out + 1), col_idx int16 when
  // in <= 65536 (read as uint16) else int32 (nnz), values (nnz)). See sparse/sparse_core.h.
  m.def("pack_sparse(Tensor weight) -> (Tensor, Tensor, Tensor)");
  // act(input @ W^T + bias) for W in pack_sparse's form: input (..., in_features) -> (..., out).
  m.def("sparse_linear(Tensor input, Tensor row_ptr, Tensor col_idx, Tensor values, int in_features, "
        "Tensor? bias=None, bool relu=False) -> Tensor");
  // Direct convolution with a packed filter: weight_shape = [out, in/groups, kh, kw], its columns the
  // flattened (in/groups, kh, kw) taps. act(conv(input) + bias + residual): input (N, C, H, W).
  m.def("sparse_conv2d(Tensor input, Tensor row_ptr, Tensor col_idx, Tensor values, int[] weight_shape, "
        "Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool relu=False, "
        "Tensor? residual=None) -> Tensor");
}

// The shared object is a Python extension only so that `import fastprune._C` loads it; the ops are
// reached through torch.ops.fastprune.
static PyModuleDef fp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fp_module); }
