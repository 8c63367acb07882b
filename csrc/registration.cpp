// The only TORCH_LIBRARY of fastprune: every schema in one place. Implementations register
// themselves with TORCH_LIBRARY_IMPL in the file that defines them (woodbury/woodbury_cpu.cpp,
// sparse/sparse_cpu.cpp, ...).
#include <Python.h>
#include <torch/library.h>

#include <torch/headeronly/version.h>

#include "common/cpu_features.h"
#include "common/kernel_log.h"
#include "sparse/sparse.h"
#include "sparse/sparse_jit.h"

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
  // down(act(up(input))) for two packed weights, act in {"none", "relu", "gelu"} (exact erf GELU):
  // input (..., in_features) -> (..., out of the second); the second's inputs are the first's outputs.
  m.def("sparse_ffn(Tensor input, Tensor row_ptr1, Tensor col_idx1, Tensor values1, Tensor? bias1, "
        "Tensor row_ptr2, Tensor col_idx2, Tensor values2, Tensor? bias2, int in_features, str activation) -> Tensor");
  // Direct convolution with a packed filter: weight_shape = [out, in/groups, kh, kw], its columns the
  // flattened (in/groups, kh, kw) taps. act(conv(input) + bias + residual): input (N, C, H, W).
  m.def("sparse_conv2d(Tensor input, Tensor row_ptr, Tensor col_idx, Tensor values, int[] weight_shape, "
        "Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool relu=False, "
        "Tensor? residual=None) -> Tensor");
  // A ResNet bottleneck without downsampling: relu(conv3(relu(conv2(relu(conv1(input) + b1)) + b2)) + b3 +
  // input) with conv1, conv3 1x1 (their shapes from row_ptr and the input), conv2 weight_shape2 with stride
  // 1 and padding2 keeping the size: input (N, C, H, W) -> (N, C, H, W).
  m.def("sparse_bottleneck(Tensor input, Tensor row_ptr1, Tensor col_idx1, Tensor values1, Tensor? bias1, "
        "Tensor row_ptr2, Tensor col_idx2, Tensor values2, Tensor? bias2, int[] weight_shape2, int[2] padding2, "
        "Tensor row_ptr3, Tensor col_idx3, Tensor values3, Tensor? bias3) -> Tensor");
  // max_pool2d(input) over kernel_size windows (stride, padding: -inf outside; 2 * padding <= kernel_size,
  // no dilation, no ceil mode), then ReLU when relu: input (N, C, H, W) in any memory format ->
  // (N, C, Hout, Wout) NCHW-contiguous. The CPU's fast path reads channels-last input (a dense conv's
  // output, sparsify's stem) and writes NCHW for the sparse convs after it.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool relu=False) -> Tensor");
  // NISP score propagation through one layer: weight (out, in/groups, *kernel), scores (m, out) or (out,)
  // -> (m, in) or (in,) with S_in[:, c] = sum_o S_out[:, o] * sum_k |W[o, c, k]| within each group.
  // softmax(scale * query @ key^T + attn_mask) @ value (torch's F.scaled_dot_product_attention without dropout
  // or causal flag): query (..., L, E), key (..., S, E), value (..., S, Ev) with the same leading dims ->
  // (..., L, Ev); attn_mask bool (True takes part) or additive, broadcast to (..., L, S); scale default
  // 1 / sqrt(E). A row with every key masked out gives 0, as torch's.
  m.def("scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
        "float? scale=None) -> Tensor");
  m.def("nisp_propagate(Tensor weight, Tensor scores, int groups=1) -> Tensor");
}

// The shared object is a Python extension so that `import fastprune._C` loads it; the ops are reached
// through torch.ops.fastprune. Its few module functions say which CPU paths exist and which ran
// (fastprune.ops.kernel_counts and friends): tests check that the path they force is the one taken.
namespace {

PyObject* fp_kernel_counts(PyObject*, PyObject*) {
  using fastprune::KernelOp;
  using fastprune::KernelPath;
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  for (int o = 0; o < static_cast<int>(KernelOp::kCount); ++o) {
    for (int p = 0; p < static_cast<int>(KernelPath::kCount); ++p) {
      const int64_t n = fastprune::kernel_count(static_cast<KernelOp>(o), static_cast<KernelPath>(p));
      if (n == 0) continue;
      PyObject* key = Py_BuildValue("(ss)", fastprune::kernel_op_name(static_cast<KernelOp>(o)),
                                    fastprune::kernel_path_name(static_cast<KernelPath>(p)));
      PyObject* val = PyLong_FromLongLong(n);
      const int rc = (key != nullptr && val != nullptr) ? PyDict_SetItem(out, key, val) : -1;
      Py_XDECREF(key);
      Py_XDECREF(val);
      if (rc != 0) {
        Py_DECREF(out);
        return nullptr;
      }
    }
  }
  return out;
}

PyObject* fp_reset_kernel_counts(PyObject*, PyObject*) {
  fastprune::reset_kernel_counts();
  Py_RETURN_NONE;
}

PyObject* fp_best_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastprune::isa_name(fastprune::detected_isa()));
}

PyObject* fp_jit_built(PyObject*, PyObject*) {
  if (fastprune::sparse::jit::built()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* fp_derived_computed(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fastprune::sparse::derived_computed());
}

PyObject* fp_torch_version(PyObject*, PyObject*) {
  return Py_BuildValue("(iii)", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
}

PyMethodDef fp_methods[] = {
    {"torch_version", fp_torch_version, METH_NOARGS, "(major, minor, patch) of the torch this was built against"},
    {"kernel_counts", fp_kernel_counts, METH_NOARGS, "{(op, path): calls} since the last reset"},
    {"reset_kernel_counts", fp_reset_kernel_counts, METH_NOARGS, "zero every counter"},
    {"best_isa", fp_best_isa, METH_NOARGS, "the best vector ISA this CPU runs (FASTPRUNE_ISA ignored)"},
    {"derived_computed", fp_derived_computed, METH_NOARGS,
     "times the CPU sparse kernels derived data from a packed weight (cache misses)"},
    {"jit_built", fp_jit_built, METH_NOARGS, "whether this build has the run-time conv code generator"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef fp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fp_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fp_module); }
