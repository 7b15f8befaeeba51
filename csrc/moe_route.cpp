// Torch bindings of the MoE routing / permutation kernels (csrc/moe_route.cu).
//
// The CUDA side knows nothing of torch: this file checks every tensor (device, dtype, shape,
// contiguity), takes the current CUDA stream of the tensor's device from c10 and calls the
// extern "C" launchers of moe_route.h. Outputs are allocated by the Python caller
// (r1fast/ops/moe_route.py, r1fast/ops/moe_permute.py), so tests can hand in poisoned buffers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "moe_route.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return R1_FLOAT32;
    case at::kHalf: return R1_FLOAT16;
    case at::kBFloat16: return R1_BFLOAT16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void raise_if(int rc, const char* op) {
  TORCH_CHECK(rc == 0, "r1fast ", op, " CUDA kernel failed: ", r1_error_string(rc));
}

}  // namespace

void moe_route_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& replay, at::Tensor weights,
                   at::Tensor indices, at::Tensor counts, int64_t topk, int64_t score,
                   int64_t n_groups, int64_t topk_groups, int64_t group_m, double scaling,
                   bool normalize) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E]");
  check(logits, "logits", logits.scalar_type(), logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check(weights, "weights", at::kFloat, logits);
  check_shape(weights, "weights", {T, topk});
  check(indices, "indices", at::kLong, logits);
  check_shape(indices, "indices", {T, topk});
  check(counts, "counts", at::kLong, logits);
  check_shape(counts, "counts", {E});
  if (bias) {
    check(*bias, "expert_bias", at::kFloat, logits);
    check_shape(*bias, "expert_bias", {E});
  }
  if (replay) {
    check(*replay, "replay_indices", at::kLong, logits);
    check_shape(*replay, "replay_indices", {T, topk});
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const r1_route_params p{T, (int)E, (int)topk, (int)score, (int)n_groups, (int)topk_groups,
                          (int)group_m, normalize ? 1 : 0, (float)scaling};
  raise_if(r1_moe_route_fwd(logits.data_ptr(), dtype_code(logits, "logits"),
                            bias ? bias->data_ptr<float>() : nullptr,
                            replay ? replay->data_ptr<int64_t>() : nullptr,
                            weights.data_ptr<float>(), indices.data_ptr<int64_t>(),
                            counts.data_ptr<int64_t>(), p, stream_of(logits)),
           "moe_route_fwd");
}

void moe_route_bwd(const at::Tensor& grad_weights, const at::Tensor& logits,
                   const at::Tensor& indices, at::Tensor grad_logits, int64_t score,
                   double scaling, bool normalize) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E]");
  check(logits, "logits", logits.scalar_type(), logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T, "indices must be [T, k]");
  const int64_t k = indices.size(1);
  check(indices, "indices", at::kLong, logits);
  check(grad_weights, "grad_weights", at::kFloat, logits);
  check_shape(grad_weights, "grad_weights", {T, k});
  check(grad_logits, "grad_logits", logits.scalar_type(), logits);
  check_shape(grad_logits, "grad_logits", {T, E});
  const c10::cuda::CUDAGuard guard(logits.device());
  const r1_route_params p{T, (int)E, (int)k, (int)score, 1, 1, 1, normalize ? 1 : 0,
                          (float)scaling};
  raise_if(r1_moe_route_bwd(grad_weights.data_ptr<float>(), logits.data_ptr(),
                            dtype_code(logits, "logits"), indices.data_ptr<int64_t>(),
                            grad_logits.data_ptr(), p, stream_of(logits)),
           "moe_route_bwd");
}

void moe_aux_scores_fwd(const at::Tensor& logits, at::Tensor scores, at::Tensor counts,
                        int64_t topk, bool sigmoid) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E]");
  check(logits, "logits", logits.scalar_type(), logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check(scores, "scores", at::kFloat, logits);
  check_shape(scores, "scores", {T, E});
  check(counts, "counts", at::kLong, logits);
  check_shape(counts, "counts", {E});
  const c10::cuda::CUDAGuard guard(logits.device());
  raise_if(r1_moe_aux_scores_fwd(logits.data_ptr(), dtype_code(logits, "logits"),
                                 scores.data_ptr<float>(), counts.data_ptr<int64_t>(), T, (int)E,
                                 (int)topk, sigmoid ? 1 : 0, stream_of(logits)),
           "moe_aux_scores_fwd");
}

void moe_aux_scores_bwd(const at::Tensor& grad_scores, const at::Tensor& logits,
                        at::Tensor grad_logits, bool sigmoid) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E]");
  check(logits, "logits", logits.scalar_type(), logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check(grad_scores, "grad_scores", at::kFloat, logits);
  check_shape(grad_scores, "grad_scores", {T, E});
  check(grad_logits, "grad_logits", logits.scalar_type(), logits);
  check_shape(grad_logits, "grad_logits", {T, E});
  const c10::cuda::CUDAGuard guard(logits.device());
  raise_if(r1_moe_aux_scores_bwd(grad_scores.data_ptr<float>(), logits.data_ptr(),
                                 dtype_code(logits, "logits"), grad_logits.data_ptr(), T, (int)E,
                                 sigmoid ? 1 : 0, stream_of(logits)),
           "moe_aux_scores_bwd");
}

void moe_scatter_rows(const at::Tensor& x, const at::Tensor& row_map,
                      const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& y, at::Tensor out,
                      const std::optional<at::Tensor>& dw) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, H]");
  check(x, "x", x.scalar_type(), x);
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(row_map.dim() == 2 && row_map.size(0) == T, "row_map must be [T, k]");
  const int64_t k = row_map.size(1);
  check(row_map, "row_map", at::kLong, x);
  check(out, "out", x.scalar_type(), x);
  check_shape(out, "out", {T * k, H});
  if (weights) {
    check(*weights, "weights", at::kFloat, x);
    check_shape(*weights, "weights", {T, k});
  }
  TORCH_CHECK(y.has_value() == dw.has_value(), "y and dw must be given together");
  if (y) {
    check(*y, "y", x.scalar_type(), x);
    check_shape(*y, "y", {T * k, H});
    check(*dw, "dw", at::kFloat, x);
    check_shape(*dw, "dw", {T, k});
  }
  const c10::cuda::CUDAGuard guard(x.device());
  raise_if(r1_moe_scatter_rows(x.data_ptr(), dtype_code(x, "x"), row_map.data_ptr<int64_t>(),
                               weights ? weights->data_ptr<float>() : nullptr,
                               y ? y->data_ptr() : nullptr, out.data_ptr(),
                               dw ? dw->data_ptr<float>() : nullptr, T, (int)k, H,
                               stream_of(x)),
           "moe_scatter_rows");
}

void moe_gather_combine(const at::Tensor& y, const at::Tensor& row_map,
                        const std::optional<at::Tensor>& weights, at::Tensor out) {
  TORCH_CHECK(y.dim() == 2, "y must be 2-D [T*k, H]");
  check(y, "y", y.scalar_type(), y);
  TORCH_CHECK(row_map.dim() == 2, "row_map must be [T, k]");
  const int64_t T = row_map.size(0), k = row_map.size(1), H = y.size(1);
  check(row_map, "row_map", at::kLong, y);
  check_shape(y, "y", {T * k, H});
  check(out, "out", y.scalar_type(), y);
  check_shape(out, "out", {T, H});
  if (weights) {
    check(*weights, "weights", at::kFloat, y);
    check_shape(*weights, "weights", {T, k});
  }
  const c10::cuda::CUDAGuard guard(y.device());
  raise_if(r1_moe_gather_combine(y.data_ptr(), dtype_code(y, "y"), row_map.data_ptr<int64_t>(),
                                 weights ? weights->data_ptr<float>() : nullptr, out.data_ptr(),
                                 T, (int)k, H, stream_of(y)),
           "moe_gather_combine");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r1fast MoE routing and permutation CUDA kernels";
  m.def("moe_route_fwd", &moe_route_fwd, "top-k routing forward (writes weights/indices/counts)");
  m.def("moe_route_bwd", &moe_route_bwd, "top-k routing backward (writes grad_logits)");
  m.def("moe_aux_scores_fwd", &moe_aux_scores_fwd, "aux-loss scores and top-k counts");
  m.def("moe_aux_scores_bwd", &moe_aux_scores_bwd, "aux-loss scores backward");
  m.def("moe_scatter_rows", &moe_scatter_rows, "out[row_map[t,j]] = w[t,j] x[t] (+ dw)");
  m.def("moe_gather_combine", &moe_gather_combine, "out[t] = sum_j w[t,j] y[row_map[t,j]]");
}
