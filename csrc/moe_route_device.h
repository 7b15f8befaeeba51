// Device helpers of csrc/moe_route.cu: dtype conversion, warp reductions and the warp argmax
// with its tie rule, register gathers, row loads and the row softmax. CUDA-only (include from
// .cu files); no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include "moe_route.h"

namespace r1 {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int kNone = 0x7fffffff;  // "no candidate" index: worse than any real candidate
constexpr float kEps = 1e-20f;     // Megatron's epsilon in the weight normalisation

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Is candidate (k1, i1) better than (k2, i2)? Larger key wins, then the lower index; NaN is
// above every number (as torch.sort orders it). A total order even with NaN keys, so both lanes
// of every shuffle exchange keep the same winner (with `k1 > k2` alone, lane i could keep a NaN
// and lane i^16 a number, the lanes would disagree on the winner, and an expert could be
// picked twice in a row).
__device__ __forceinline__ bool better(float k1, int i1, float k2, int i2) {
  if (i2 == kNone) return i1 != kNone;
  if (i1 == kNone) return false;
  const bool nan1 = isnan(k1), nan2 = isnan(k2);
  if (nan1 != nan2) return nan1;
  return (!nan1 && k1 > k2) || ((nan1 || k1 == k2) && i1 < i2);
}

// Warp-wide best (key, idx), carrying `val` along; every lane ends with the same winner.
__device__ __forceinline__ void warp_argmax(float& key, int& idx, float& val) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ok = __shfl_xor_sync(kFull, key, o);
    const int oi = __shfl_xor_sync(kFull, idx, o);
    const float ov = __shfl_xor_sync(kFull, val, o);
    if (better(ok, oi, key, idx)) {
      key = ok;
      idx = oi;
      val = ov;
    }
  }
}

// Best candidate among this lane's values whose bit is set in `mask`, then across the warp.
template <int VPT>
__device__ __forceinline__ void masked_argmax(const float (&key)[VPT], const float (&val)[VPT],
                                              unsigned mask, int lane, float& bk, int& bi,
                                              float& bv) {
  bk = -CUDART_INF_F;
  bi = kNone;
  bv = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + kWarp * i;
    if (((mask >> i) & 1u) && better(key[i], e, bk, bi)) {
      bk = key[i];
      bi = e;
      bv = val[i];
    }
  }
  warp_argmax(bk, bi, bv);
}

// Register value of slot `slot` without dynamic register indexing (which would spill).
template <int VPT>
__device__ __forceinline__ float pick(const float (&v)[VPT], int slot) {
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) r = (i == slot) ? v[i] : r;
  return r;
}

// Value at expert e (any lane may ask; e is the same in every lane).
template <int VPT>
__device__ __forceinline__ float warp_gather(const float (&v)[VPT], int e) {
  return __shfl_sync(kFull, pick<VPT>(v, e / kWarp), e % kWarp);
}

template <typename T, int VPT>
__device__ __forceinline__ unsigned load_row(const T* __restrict__ row, int E, int lane,
                                             float (&l)[VPT]) {
  unsigned valid = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + kWarp * i;
    const bool ok = e < E;
    l[i] = ok ? to_float(row[e]) : -CUDART_INF_F;
    if (ok) valid |= 1u << i;
  }
  return valid;
}

// In place: logits -> full softmax (padding: exp(-inf) = 0).
template <int VPT>
__device__ __forceinline__ void softmax_row(float (&s)[VPT]) {
  float mx = -CUDART_INF_F;
#pragma unroll
  for (int i = 0; i < VPT; ++i) mx = fmaxf(mx, s[i]);
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    s[i] = expf(s[i] - mx);
    sum += s[i];
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int i = 0; i < VPT; ++i) s[i] = s[i] / sum;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// In place: logits -> routing scores (softmax after top-k keeps the logits).
template <int VPT>
__device__ __forceinline__ void route_scores(float (&s)[VPT], int score) {
  if (score == R1_SOFTMAX_PRE) {
    softmax_row<VPT>(s);
  } else if (score == R1_SIGMOID) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] = sigmoidf_(s[i]);
  }
}

}  // namespace r1
