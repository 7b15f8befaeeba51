/* C interface of r1fast's MoE routing and permutation kernels (csrc/moe_route.cu).
 *
 * The .cu side includes no torch header: every launcher takes raw device pointers, sizes and a
 * cudaStream_t, and returns 0 on success, R1_ERR_ARGS for arguments it does not support, or a
 * cudaError_t value; r1_error_string() turns the code into text. The torch bindings
 * (csrc/moe_route.cpp) validate tensors and pass the current CUDA stream.
 *
 * All tensors are contiguous and row-major. Math is fp32 whatever the storage dtype.
 * Semantics are those of r1fast.ops.moe_route / r1fast.ops.moe_permute (see their docstrings).
 */
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* storage dtype of logits / rows */
enum { R1_FLOAT32 = 0, R1_FLOAT16 = 1, R1_BFLOAT16 = 2 };
/* score function (shared with kernels/moe_route.py and r1fast/ops/moe_route.py) */
enum { R1_SOFTMAX_POST = 0, R1_SOFTMAX_PRE = 1, R1_SIGMOID = 2 };

#define R1_MAX_EXPERTS 512 /* 32 lanes x 16 values per lane */
#define R1_MAX_TOPK 16
#define R1_MAX_GROUPS 64 /* group scores live in 2 registers per lane */
#define R1_ERR_ARGS (-1)

typedef struct r1_route_params {
  int64_t num_tokens; /* T */
  int num_experts;    /* E <= R1_MAX_EXPERTS */
  int topk;           /* k <= R1_MAX_TOPK */
  int score;          /* R1_SOFTMAX_POST | R1_SOFTMAX_PRE | R1_SIGMOID */
  int n_groups;       /* 1 = no group-limited routing */
  int topk_groups;    /* groups kept per token */
  int group_m;        /* a group's score is the sum of its top-group_m keys */
  int normalize;      /* divide the selected scores by their sum + 1e-20 */
  float scaling;      /* final multiplier of the weights */
} r1_route_params;

/* logits [T, E] -> weights [T, k] fp32, indices [T, k] int64, counts [E] int64 (zeroed here).
 * bias [E] fp32 or NULL (selection only); replay [T, k] int64 or NULL (replaces selection). */
int r1_moe_route_fwd(const void* logits, int dtype, const float* bias, const int64_t* replay,
                     float* weights, int64_t* indices, int64_t* counts, r1_route_params p,
                     cudaStream_t stream);

/* grad_weights [T, k] fp32, logits [T, E], indices [T, k] -> grad_logits [T, E] (dtype). */
int r1_moe_route_bwd(const float* grad_weights, const void* logits, int dtype,
                     const int64_t* indices, void* grad_logits, r1_route_params p,
                     cudaStream_t stream);

/* Aux-loss scores: softmax(l) or sigmoid(l)/(sum+1e-20) -> scores [T, E] fp32, and counts [E]
 * int64 (zeroed here) of a plain top-k on the scores, ties to the lowest index. */
int r1_moe_aux_scores_fwd(const void* logits, int dtype, float* scores, int64_t* counts,
                          int64_t T, int E, int topk, int sigmoid, cudaStream_t stream);
int r1_moe_aux_scores_bwd(const float* grad_scores, const void* logits, int dtype,
                          void* grad_logits, int64_t T, int E, int sigmoid, cudaStream_t stream);

/* out[row_map[t, j]] = w[t, j] * x[t] (w NULL: 1); if y != NULL also
 * dw[t, j] = <y[row_map[t, j]], x[t]> (fp32). x [T, H], out/y [T*k, H] of `dtype`. */
int r1_moe_scatter_rows(const void* x, int dtype, const int64_t* row_map, const float* w,
                        const void* y, void* out, float* dw, int64_t T, int k, int64_t H,
                        cudaStream_t stream);

/* out[t] = sum_{j=0..k-1} w[t, j] * y[row_map[t, j]] (w NULL: 1), fp32 sum in slot order. */
int r1_moe_gather_combine(const void* y, int dtype, const int64_t* row_map, const float* w,
                          void* out, int64_t T, int k, int64_t H, cudaStream_t stream);

const char* r1_error_string(int code);

#ifdef __cplusplus
}
#endif
