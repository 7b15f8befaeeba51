// CUDA kernels for MoE routing (top-k with score function, groups, bias, replay, aux-loss
// scores; forward and backward) and token permutation (row scatter / weighted gather).
//
// Routing: one warp per token. Lane `l` holds experts l, l+32, l+64, ... (VPT = ceil(E/32)
// values, a compile-time 1..16, so E <= 512), loaded coalesced. Every reduction is a warp
// butterfly (__shfl_xor_sync), which leaves the same bits in every lane. Top-k is k rounds of
// a warp argmax on (key, index) ordered by "larger key, then lower index": ties break to the
// lowest expert, as in the torch and Triton paths. Slot j of the result lives in lane j
// (k <= 16), so weights and indices are stored coalesced. Warps grid-stride over tokens; the
// per-expert counts go to a shared-memory histogram (integer atomics: exact) and are flushed
// to global memory once per block. The backward recomputes the scores from the logits and
// writes each dlogits element once (a per-warp shared row scatters the k slot gradients).
// Permutation: one block per token, 16-byte vector loads when the row allows; every output
// element is written by one thread, and the k-slot sums and dot products are reduced in a fixed
// order: no float atomics anywhere, results are bitwise reproducible.
// No torch headers (moe_route.h); fp32 math, no fast-math: expf and divisions are IEEE-accurate.
#include <type_traits>

#include "moe_route.h"
#include "moe_route_device.h"

namespace {

using namespace r1;

// Group-limited routing: the candidate mask restricted to the best topk_groups groups.
template <int VPT>
__device__ unsigned group_filter(const float (&key)[VPT], unsigned avail, int lane,
                                 const r1_route_params& p) {
  const int G = p.n_groups;
  const int eg = p.num_experts / G;
  float gs_lo = -CUDART_INF_F, gs_hi = -CUDART_INF_F;  // lane g: groups g and g + 32
  float unused[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) unused[i] = 0.f;
  for (int g = 0; g < G; ++g) {
    unsigned in_g = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      if (((avail >> i) & 1u) && e / eg == g) in_g |= 1u << i;
    }
    float acc = 0.f;  // sum of the group's top-m keys, largest first (as torch and Triton)
    for (int m = 0; m < p.group_m; ++m) {
      float bk, bv;
      int bi;
      masked_argmax<VPT>(key, unused, in_g, lane, bk, bi, bv);
      if (bi == kNone) break;
      acc += bk;
      if (bi % kWarp == lane) in_g &= ~(1u << (bi / kWarp));
    }
    if (g % kWarp == lane) {
      if (g < kWarp) gs_lo = acc;
      else gs_hi = acc;
    }
  }
  unsigned long long chosen = 0ull;
  for (int r = 0; r < p.topk_groups; ++r) {
    float bk = -CUDART_INF_F, bv = 0.f;
    int bi = kNone;
    if (lane < G && !((chosen >> lane) & 1ull)) {
      bk = gs_lo;
      bi = lane;
    }
    const int hi = lane + kWarp;
    if (hi < G && !((chosen >> hi) & 1ull) && better(gs_hi, hi, bk, bi)) {
      bk = gs_hi;
      bi = hi;
    }
    warp_argmax(bk, bi, bv);
    if (bi == kNone) break;
    chosen |= 1ull << bi;
  }
  unsigned keep = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + kWarp * i;
    if (((avail >> i) & 1u) && ((chosen >> (e / eg)) & 1ull)) keep |= 1u << i;
  }
  return keep;
}

// Weights of the k selected scores held in lanes 0..k-1 (u = selected score in lane j).
__device__ __forceinline__ float route_weight(float u, bool in_k, const r1_route_params& p) {
  if (p.score == R1_SOFTMAX_POST) {  // softmax over the k selected logits
    const float mx = warp_max(in_k ? u : -CUDART_INF_F);
    const float ex = in_k ? expf(u - mx) : 0.f;
    u = ex / warp_sum(ex);
  }
  if (p.normalize) u = u / (warp_sum(in_k ? u : 0.f) + kEps);
  return u * p.scaling;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
route_fwd_kernel(const T* __restrict__ logits, const float* __restrict__ bias,
                 const int64_t* __restrict__ replay, float* __restrict__ weights,
                 int64_t* __restrict__ indices, unsigned long long* __restrict__ counts,
                 r1_route_params p) {
  extern __shared__ int hist[];  // [E] block-local counts
  const int E = p.num_experts, K = p.topk;
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t t = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; t < p.num_tokens;
       t += stride) {
    float s[VPT];
    unsigned avail = load_row<T, VPT>(logits + t * E, E, lane, s);
    route_scores<VPT>(s, p.score);
    int my_idx = 0;  // lane j < k: expert of slot j
    float my_u = 0.f;  // lane j < k: its score
    if (replay != nullptr) {
      if (lane < K) my_idx = (int)replay[t * K + lane];
      for (int j = 0; j < K; ++j) {
        const int e = __shfl_sync(kFull, my_idx, j);
        const float v = warp_gather<VPT>(s, e);
        if (lane == j) my_u = v;
      }
    } else {
      float key[VPT];
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int e = lane + kWarp * i;
        key[i] = s[i] + ((bias != nullptr && e < E) ? bias[e] : 0.f);
      }
      if (p.n_groups > 1) avail = group_filter<VPT>(key, avail, lane, p);
      for (int j = 0; j < K; ++j) {
        float bk, bs;
        int bi;
        masked_argmax<VPT>(key, s, avail, lane, bk, bi, bs);
        if (bi == kNone) break;  // fewer candidates than k: excluded by the host checks
        if (bi % kWarp == lane) avail &= ~(1u << (bi / kWarp));
        if (lane == j) {
          my_idx = bi;
          my_u = bs;
        }
      }
    }
    const bool in_k = lane < K;
    const float w = route_weight(my_u, in_k, p);
    if (in_k) {
      weights[t * K + lane] = w;
      indices[t * K + lane] = my_idx;
      if (my_idx >= 0 && my_idx < E) atomicAdd(&hist[my_idx], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e] != 0) atomicAdd(&counts[e], (unsigned long long)hist[e]);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
route_bwd_kernel(const float* __restrict__ grad_w, const T* __restrict__ logits,
                 const int64_t* __restrict__ indices, T* __restrict__ grad_logits,
                 r1_route_params p) {
  extern __shared__ float row_buf_all[];  // [warps, E]: slot gradients scattered to experts
  const int E = p.num_experts, K = p.topk;
  const int lane = threadIdx.x % kWarp;
  float* row_buf = row_buf_all + (threadIdx.x / kWarp) * E;
  const int64_t stride = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t t = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; t < p.num_tokens;
       t += stride) {
    float s[VPT];
    load_row<T, VPT>(logits + t * E, E, lane, s);
    route_scores<VPT>(s, p.score);
    const bool in_k = lane < K;
    const int my_idx = in_k ? (int)indices[t * K + lane] : 0;
    const float g = in_k ? grad_w[t * K + lane] : 0.f;
    float raw = 0.f;
    for (int j = 0; j < K; ++j) {
      const float v = warp_gather<VPT>(s, __shfl_sync(kFull, my_idx, j));
      if (lane == j) raw = v;
    }
    float u = raw;
    if (p.score == R1_SOFTMAX_POST) {
      const float mx = warp_max(in_k ? u : -CUDART_INF_F);
      const float ex = in_k ? expf(u - mx) : 0.f;
      u = ex / warp_sum(ex);
    }
    // w = scaling * u / S  (S = sum u + eps)  or  w = scaling * u
    float du;
    if (p.normalize) {
      const float S = warp_sum(in_k ? u : 0.f) + kEps;
      const float gu = warp_sum(in_k ? g * u : 0.f);
      du = p.scaling * (g / S - gu / (S * S));
    } else {
      du = p.scaling * g;
    }
    if (!in_k) du = 0.f;
    float dz = du, coef = 0.f;
    if (p.score == R1_SOFTMAX_POST) {
      dz = u * (du - warp_sum(du * u));
    } else if (p.score == R1_SIGMOID) {
      dz = du * raw * (1.f - raw);
    } else {  // full softmax: dl = s * (ds - <ds, s>), <ds, s> = <du, u>
      coef = warp_sum(du * u);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      if (e < E) row_buf[e] = 0.f;
    }
    __syncwarp();
    // a replayed id outside [0, E) (checked only in debug) must not write the next warp's row
    if (in_k && static_cast<unsigned>(my_idx) < static_cast<unsigned>(E)) row_buf[my_idx] = dz;
    __syncwarp();
    T* out = grad_logits + t * E;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      if (e < E) {
        const float ds = row_buf[e];
        out[e] = from_float<T>(p.score == R1_SOFTMAX_PRE ? s[i] * (ds - coef) : ds);
      }
    }
    __syncwarp();  // row_buf is reused by the next token of this warp
  }
}

template <int VPT>
__device__ __forceinline__ void aux_scores_row(float (&s)[VPT], unsigned valid, int sigmoid) {
  if (!sigmoid) {
    softmax_row<VPT>(s);
    return;
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    s[i] = ((valid >> i) & 1u) ? sigmoidf_(s[i]) : 0.f;
    sum += s[i];
  }
  const float S = warp_sum(sum) + kEps;
#pragma unroll
  for (int i = 0; i < VPT; ++i) s[i] = s[i] / S;
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
aux_fwd_kernel(const T* __restrict__ logits, float* __restrict__ scores,
               unsigned long long* __restrict__ counts, int64_t num_tokens, int E, int K,
               int sigmoid) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t t = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; t < num_tokens;
       t += stride) {
    float s[VPT];
    unsigned avail = load_row<T, VPT>(logits + t * E, E, lane, s);
    aux_scores_row<VPT>(s, avail, sigmoid);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      if (e < E) scores[t * E + e] = s[i];
    }
    for (int j = 0; j < K; ++j) {
      float bk, bv;
      int bi;
      masked_argmax<VPT>(s, s, avail, lane, bk, bi, bv);
      if (bi == kNone) break;
      if (bi % kWarp == lane) avail &= ~(1u << (bi / kWarp));
      if (lane == 0) atomicAdd(&hist[bi], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e] != 0) atomicAdd(&counts[e], (unsigned long long)hist[e]);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
aux_bwd_kernel(const float* __restrict__ grad_scores, const T* __restrict__ logits,
               T* __restrict__ grad_logits, int64_t num_tokens, int E, int sigmoid) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t t = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; t < num_tokens;
       t += stride) {
    float s[VPT], dp[VPT];
    const unsigned valid = load_row<T, VPT>(logits + t * E, E, lane, s);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      dp[i] = e < E ? grad_scores[t * E + e] : 0.f;
    }
    float dl[VPT];
    if (sigmoid) {  // p = sg / S: dsg = dp / S - <dp, sg> / S^2, then sigmoid'
      float sum = 0.f, dot = 0.f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        s[i] = ((valid >> i) & 1u) ? sigmoidf_(s[i]) : 0.f;
        sum += s[i];
        dot += dp[i] * s[i];
      }
      const float S = warp_sum(sum) + kEps;
      const float c = warp_sum(dot);
#pragma unroll
      for (int i = 0; i < VPT; ++i) dl[i] = (dp[i] / S - c / (S * S)) * s[i] * (1.f - s[i]);
    } else {
      softmax_row<VPT>(s);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) dot += dp[i] * s[i];
      const float c = warp_sum(dot);
#pragma unroll
      for (int i = 0; i < VPT; ++i) dl[i] = s[i] * (dp[i] - c);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + kWarp * i;
      if (e < E) grad_logits[t * E + e] = from_float<T>(dl[i]);
    }
  }
}

// ------------------------------------------------------------------------------ permutation

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

constexpr int kRowThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
scatter_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ row_map,
                    const float* __restrict__ w, const T* __restrict__ y, T* __restrict__ out,
                    float* __restrict__ dw, int64_t H, int K) {
  using P = Pack<T, VEC>;
  __shared__ int64_t rows[R1_MAX_TOPK];
  __shared__ float ws[R1_MAX_TOPK];
  __shared__ float partial[R1_MAX_TOPK][kRowThreads / kWarp];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < K) {
    rows[threadIdx.x] = row_map[t * K + threadIdx.x];
    ws[threadIdx.x] = w != nullptr ? w[t * K + threadIdx.x] : 1.f;
  }
  __syncthreads();
  float dot[R1_MAX_TOPK];
#pragma unroll
  for (int j = 0; j < R1_MAX_TOPK; ++j) dot[j] = 0.f;
  for (int64_t h = (int64_t)threadIdx.x * VEC; h < H; h += (int64_t)blockDim.x * VEC) {
    const P xv = *reinterpret_cast<const P*>(x + t * H + h);
    float xf[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) xf[v] = to_float(xv.v[v]);
#pragma unroll
    for (int j = 0; j < R1_MAX_TOPK; ++j) {
      if (j < K) {
        P o;
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.v[v] = from_float<T>(xf[v] * ws[j]);
        *reinterpret_cast<P*>(out + rows[j] * H + h) = o;
        if (y != nullptr) {
          const P yv = *reinterpret_cast<const P*>(y + rows[j] * H + h);
#pragma unroll
          for (int v = 0; v < VEC; ++v) dot[j] += to_float(yv.v[v]) * xf[v];
        }
      }
    }
  }
  if (dw == nullptr) return;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < R1_MAX_TOPK; ++j) {
    if (j < K) {
      const float d = warp_sum(dot[j]);
      if (lane == 0) partial[j][warp] = d;
    }
  }
  __syncthreads();
  if (threadIdx.x < K) {
    float d = 0.f;  // warps summed in a fixed order: deterministic
    for (int i = 0; i < (int)(blockDim.x / kWarp); ++i) d += partial[threadIdx.x][i];
    dw[t * K + threadIdx.x] = d;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
gather_combine_kernel(const T* __restrict__ y, const int64_t* __restrict__ row_map,
                      const float* __restrict__ w, T* __restrict__ out, int64_t H, int K) {
  using P = Pack<T, VEC>;
  __shared__ int64_t rows[R1_MAX_TOPK];
  __shared__ float ws[R1_MAX_TOPK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < K) {
    rows[threadIdx.x] = row_map[t * K + threadIdx.x];
    ws[threadIdx.x] = w != nullptr ? w[t * K + threadIdx.x] : 1.f;
  }
  __syncthreads();
  for (int64_t h = (int64_t)threadIdx.x * VEC; h < H; h += (int64_t)blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    // Unrolled so several row loads are in flight at once (fully unrolling all 16 slots spills
    // for 16-bit rows); the adds stay in slot order: the sum is reproducible bit for bit.
#pragma unroll 4
    for (int j = 0; j < R1_MAX_TOPK; ++j) {
      if (j < K) {
        const P yv = *reinterpret_cast<const P*>(y + rows[j] * H + h);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += ws[j] * to_float(yv.v[v]);
      }
    }
    P o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = from_float<T>(acc[v]);
    *reinterpret_cast<P*>(out + t * H + h) = o;
  }
}

// ------------------------------------------------------------------------------ dispatch

int route_grid(int64_t T) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t need = (T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = (int64_t)sms * 8;  // enough blocks to fill the GPU, few histogram flushes
  return (int)(need < cap ? need : cap);
}

int vpt_for(int E) {
  return E <= 32 ? 1 : E <= 64 ? 2 : E <= 128 ? 4 : E <= 256 ? 8 : E <= 512 ? 16 : 0;
}

// Calls f(T{}, integral_constant<VPT>) for the runtime dtype and VPT; false if unsupported.
template <typename F>
bool dispatch_route(int dtype, int E, F&& f) {
  auto with_vpt = [&](auto tag) {
    switch (vpt_for(E)) {
      case 1: f(tag, std::integral_constant<int, 1>{}); return true;
      case 2: f(tag, std::integral_constant<int, 2>{}); return true;
      case 4: f(tag, std::integral_constant<int, 4>{}); return true;
      case 8: f(tag, std::integral_constant<int, 8>{}); return true;
      case 16: f(tag, std::integral_constant<int, 16>{}); return true;
      default: return false;
    }
  };
  switch (dtype) {
    case R1_FLOAT32: return with_vpt(float{});
    case R1_FLOAT16: return with_vpt(__half{});
    case R1_BFLOAT16: return with_vpt(__nv_bfloat16{});
    default: return false;
  }
}

template <typename F>
bool dispatch_rows(int dtype, bool vectorized, F&& f) {
  switch (dtype) {
    case R1_FLOAT32:
      vectorized ? f(float{}, std::integral_constant<int, 4>{})
                 : f(float{}, std::integral_constant<int, 1>{});
      return true;
    case R1_FLOAT16:
      vectorized ? f(__half{}, std::integral_constant<int, 8>{})
                 : f(__half{}, std::integral_constant<int, 1>{});
      return true;
    case R1_BFLOAT16:
      vectorized ? f(__nv_bfloat16{}, std::integral_constant<int, 8>{})
                 : f(__nv_bfloat16{}, std::integral_constant<int, 1>{});
      return true;
    default:
      return false;
  }
}

int dtype_size(int dtype) { return dtype == R1_FLOAT32 ? 4 : 2; }

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

bool valid_route(const r1_route_params& p) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.num_experts > R1_MAX_EXPERTS) return false;
  if (p.topk < 1 || p.topk > R1_MAX_TOPK || p.topk > p.num_experts) return false;
  if (p.score < R1_SOFTMAX_POST || p.score > R1_SIGMOID) return false;
  if (p.n_groups < 1 || p.n_groups > R1_MAX_GROUPS || p.num_experts % p.n_groups != 0) return false;
  if (p.n_groups > 1 && (p.topk_groups < 1 || p.topk_groups > p.n_groups || p.group_m < 1 ||
                         p.group_m > p.num_experts / p.n_groups)) return false;
  return true;
}

}  // namespace

extern "C" {

int r1_moe_route_fwd(const void* logits, int dtype, const float* bias, const int64_t* replay,
                     float* weights, int64_t* indices, int64_t* counts, r1_route_params p,
                     cudaStream_t stream) {
  if (!valid_route(p)) return R1_ERR_ARGS;
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * p.num_experts, stream);
  if (err != cudaSuccess) return (int)err;
  if (p.num_tokens == 0) return 0;
  const int grid = route_grid(p.num_tokens);
  const size_t smem = sizeof(int) * p.num_experts;
  const bool ok = dispatch_route(dtype, p.num_experts, [&](auto tag, auto vpt) {
    using T = decltype(tag);
    route_fwd_kernel<T, decltype(vpt)::value><<<grid, kWarpsPerBlock * kWarp, smem, stream>>>(
        static_cast<const T*>(logits), bias, replay, weights, indices,
        reinterpret_cast<unsigned long long*>(counts), p);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

int r1_moe_route_bwd(const float* grad_weights, const void* logits, int dtype,
                     const int64_t* indices, void* grad_logits, r1_route_params p,
                     cudaStream_t stream) {
  if (!valid_route(p)) return R1_ERR_ARGS;
  if (p.num_tokens == 0) return 0;
  const int grid = route_grid(p.num_tokens);
  const size_t smem = sizeof(float) * p.num_experts * kWarpsPerBlock;
  const bool ok = dispatch_route(dtype, p.num_experts, [&](auto tag, auto vpt) {
    using T = decltype(tag);
    route_bwd_kernel<T, decltype(vpt)::value><<<grid, kWarpsPerBlock * kWarp, smem, stream>>>(
        grad_weights, static_cast<const T*>(logits), indices, static_cast<T*>(grad_logits), p);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

int r1_moe_aux_scores_fwd(const void* logits, int dtype, float* scores, int64_t* counts,
                          int64_t T, int E, int topk, int sigmoid, cudaStream_t stream) {
  if (T < 0 || E < 1 || E > R1_MAX_EXPERTS || topk < 1 || topk > E) return R1_ERR_ARGS;
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * E, stream);
  if (err != cudaSuccess) return (int)err;
  if (T == 0) return 0;
  const int grid = route_grid(T);
  const bool ok = dispatch_route(dtype, E, [&](auto tag, auto vpt) {
    using T_ = decltype(tag);
    aux_fwd_kernel<T_, decltype(vpt)::value><<<grid, kWarpsPerBlock * kWarp, sizeof(int) * E,
                                               stream>>>(
        static_cast<const T_*>(logits), scores, reinterpret_cast<unsigned long long*>(counts), T,
        E, topk, sigmoid);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

int r1_moe_aux_scores_bwd(const float* grad_scores, const void* logits, int dtype,
                          void* grad_logits, int64_t T, int E, int sigmoid, cudaStream_t stream) {
  if (T < 0 || E < 1 || E > R1_MAX_EXPERTS) return R1_ERR_ARGS;
  if (T == 0) return 0;
  const int grid = route_grid(T);
  const bool ok = dispatch_route(dtype, E, [&](auto tag, auto vpt) {
    using T_ = decltype(tag);
    aux_bwd_kernel<T_, decltype(vpt)::value><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
        grad_scores, static_cast<const T_*>(logits), static_cast<T_*>(grad_logits), T, E,
        sigmoid);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

int r1_moe_scatter_rows(const void* x, int dtype, const int64_t* row_map, const float* w,
                        const void* y, void* out, float* dw, int64_t T, int k, int64_t H,
                        cudaStream_t stream) {
  if (T < 0 || k < 1 || k > R1_MAX_TOPK || H < 0 || (y != nullptr) != (dw != nullptr))
    return R1_ERR_ARGS;
  if (T == 0) return 0;
  if (H == 0) {  // no elements: the dot products are empty sums
    return dw != nullptr ? (int)cudaMemsetAsync(dw, 0, sizeof(float) * T * k, stream) : 0;
  }
  const int vec = 16 / dtype_size(dtype);
  const bool vectorized = H % vec == 0 && aligned16(x) && aligned16(y) && aligned16(out);
  const bool ok = dispatch_rows(dtype, vectorized, [&](auto tag, auto v) {
    using T_ = decltype(tag);
    scatter_rows_kernel<T_, decltype(v)::value><<<(unsigned)T, kRowThreads, 0, stream>>>(
        static_cast<const T_*>(x), row_map, w, static_cast<const T_*>(y), static_cast<T_*>(out),
        dw, H, k);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

int r1_moe_gather_combine(const void* y, int dtype, const int64_t* row_map, const float* w,
                          void* out, int64_t T, int k, int64_t H, cudaStream_t stream) {
  if (T < 0 || k < 1 || k > R1_MAX_TOPK || H < 0) return R1_ERR_ARGS;
  if (T == 0 || H == 0) return 0;
  const int vec = 16 / dtype_size(dtype);
  const bool vectorized = H % vec == 0 && aligned16(y) && aligned16(out);
  const bool ok = dispatch_rows(dtype, vectorized, [&](auto tag, auto v) {
    using T_ = decltype(tag);
    gather_combine_kernel<T_, decltype(v)::value><<<(unsigned)T, kRowThreads, 0, stream>>>(
        static_cast<const T_*>(y), row_map, w, static_cast<T_*>(out), H, k);
  });
  if (!ok) return R1_ERR_ARGS;
  return (int)cudaGetLastError();
}

const char* r1_error_string(int code) {
  if (code == 0) return "no error";
  if (code == R1_ERR_ARGS) return "unsupported arguments (sizes or dtype outside its limits)";
  return cudaGetErrorString((cudaError_t)code);
}

}  // extern "C"
