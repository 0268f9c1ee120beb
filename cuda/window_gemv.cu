// Fused window products of the M-FAC dynamic algorithm ([M-FAC, App. B]):
//   p = G x     (m,)  one read of G, x reused across kMatvecRows rows per block
//   y = G^T c   (d,)  one read of G, c staged in shared memory
// G (m, d) row-major in fp32, bf16 or fp16; x, c, p, y in fp32; accumulation in fp32 always.
// Both are bandwidth-bound: the bound is m * d * sizeof(storage) bytes per call.
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mfac_kernels.h"

namespace hf_mfac {
namespace {

constexpr int kThreads = kGemvThreads;
constexpr int kRows = kMatvecRows;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// N consecutive elements, aligned so that a load is one (or, for 32-byte float packs, two)
// vector instructions.
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// G is read exactly once per call: load it with the streaming (evict-first) hint when the pack is a
// full 16-byte vector.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_stream(const T* p) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    Pack<T, N> r;
    memcpy(&r, &u, 16);
    return r;
  } else {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (ceil(m / kRows), splits): block (g, s) computes rows g*kRows.. of G[:, s*chunk:(s+1)*chunk] x.
// out + s * m receives the slice's partial sums (out is p itself when splits == 1).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
window_matvec_kernel(const T* __restrict__ G, const float* __restrict__ x, float* __restrict__ out,
                     int64_t m, int64_t d, int64_t chunk) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t beg = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = beg + chunk < d ? beg + chunk : d;
  const T* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = G + (row0 + r < m ? row0 + r : m - 1) * d;  // clamp: discarded
  float acc[kRows] = {};
  for (int64_t j = beg + static_cast<int64_t>(threadIdx.x) * VEC; j < end; j += int64_t{kThreads} * VEC) {
    const Pack<float, VEC> xv = *reinterpret_cast<const Pack<float, VEC>*>(x + j);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const Pack<T, VEC> gv = load_stream<T, VEC>(rows[r] + j);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r] = fmaf(to_f32(gv.v[e]), xv.v[e], acc[r]);
    }
  }
  __shared__ float red[kRows][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[r][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRows && row0 + threadIdx.x < m) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[threadIdx.x][w];
    out[static_cast<int64_t>(blockIdx.y) * m + row0 + threadIdx.x] = s;
  }
}

// grid (ceil(d / (kThreads * VEC)), splits): thread owns columns j..j+VEC of rows
// [s*chunk, (s+1)*chunk); out + s * d receives the slice's partial sums.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
window_rmatvec_kernel(const T* __restrict__ G, const float* __restrict__ c, float* __restrict__ out,
                      int64_t m, int64_t d, int64_t chunk) {
  __shared__ float cs[kThreads];
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  const int64_t rbeg = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t rend = rbeg + chunk < m ? rbeg + chunk : m;
  float acc[VEC] = {};
  for (int64_t r0 = rbeg; r0 < rend; r0 += kThreads) {
    const int nr = rend - r0 < kThreads ? static_cast<int>(rend - r0) : kThreads;
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < nr) cs[threadIdx.x] = c[r0 + threadIdx.x];
    __syncthreads();
    if (j < d) {
      const T* p = G + r0 * d + j;
      int i = 0;
      for (; i + 4 <= nr; i += 4) {  // four independent loads in flight per thread
        Pack<T, VEC> g[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) g[u] = load_stream<T, VEC>(p + (i + u) * d);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] = fmaf(cs[i + u], to_f32(g[u].v[e]), acc[e]);
      }
      for (; i < nr; ++i) {
        const Pack<T, VEC> g = load_stream<T, VEC>(p + static_cast<int64_t>(i) * d);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = fmaf(cs[i], to_f32(g.v[e]), acc[e]);
      }
    }
  }
  if (j < d) {
    Pack<float, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = acc[e];
    *reinterpret_cast<Pack<float, VEC>*>(out + static_cast<int64_t>(blockIdx.y) * d + j) = o;
  }
}

// out[i] = sum_s partial[s * n + i], summed in a fixed order (deterministic).
__global__ void __launch_bounds__(kThreads)
sum_splits_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t n, int64_t splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += partial[k * n + i];
    out[i] = s;
  }
}

cudaError_t sum_splits(const float* partial, float* out, int64_t n, int64_t splits, cudaStream_t stream) {
  const int64_t blocks = ceil_div(n, kThreads) < 65535 ? ceil_div(n, kThreads) : 65535;
  sum_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial, out, n, splits);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t matvec_typed(const void* G, const float* x, float* out, float* partial, int64_t m, int64_t d,
                         const GemvPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m, kRows)), static_cast<unsigned>(plan.splits));
  float* dst = plan.splits > 1 ? partial : out;
  window_matvec_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(G), x, dst, m, d, plan.chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  return sum_splits(partial, out, m, plan.splits, stream);
}

template <typename T, int VEC>
cudaError_t rmatvec_typed(const void* G, const float* c, float* out, float* partial, int64_t m, int64_t d,
                          const GemvPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(d, int64_t{kThreads} * VEC)), static_cast<unsigned>(plan.splits));
  float* dst = plan.splits > 1 ? partial : out;
  window_rmatvec_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(G), c, dst, m, d, plan.chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  return sum_splits(partial, out, d, plan.splits, stream);
}

// Instantiate one kernel per (storage, vector width); Fn<T, VEC> is matvec_typed or rmatvec_typed.
template <template <typename, int> class Fn, typename... Args>
cudaError_t dispatch(Storage storage, int vec, Args... args) {
  switch (storage) {
    case Storage::kF32:
      switch (vec) {
        case 4: return Fn<float, 4>::run(args...);
        case 2: return Fn<float, 2>::run(args...);
        case 1: return Fn<float, 1>::run(args...);
        default: return cudaErrorInvalidValue;
      }
    case Storage::kBF16:
      switch (vec) {
        case 8: return Fn<__nv_bfloat16, 8>::run(args...);
        case 4: return Fn<__nv_bfloat16, 4>::run(args...);
        case 2: return Fn<__nv_bfloat16, 2>::run(args...);
        case 1: return Fn<__nv_bfloat16, 1>::run(args...);
        default: return cudaErrorInvalidValue;
      }
    case Storage::kF16:
      switch (vec) {
        case 8: return Fn<__half, 8>::run(args...);
        case 4: return Fn<__half, 4>::run(args...);
        case 2: return Fn<__half, 2>::run(args...);
        case 1: return Fn<__half, 1>::run(args...);
        default: return cudaErrorInvalidValue;
      }
  }
  return cudaErrorInvalidValue;
}

template <typename T, int VEC>
struct Matvec {
  template <typename... A>
  static cudaError_t run(A... a) { return matvec_typed<T, VEC>(a...); }
};

template <typename T, int VEC>
struct Rmatvec {
  template <typename... A>
  static cudaError_t run(A... a) { return rmatvec_typed<T, VEC>(a...); }
};

}  // namespace

cudaError_t launch_window_matvec(Storage storage, const void* G, const float* x, float* out, float* partial,
                                 int64_t m, int64_t d, const GemvPlan& plan, cudaStream_t stream) {
  if (m <= 0 || d <= 0) return cudaSuccess;
  return dispatch<Matvec>(storage, plan.vec, G, x, out, partial, m, d, plan, stream);
}

cudaError_t launch_window_rmatvec(Storage storage, const void* G, const float* c, float* out, float* partial,
                                  int64_t m, int64_t d, const GemvPlan& plan, cudaStream_t stream) {
  if (m <= 0 || d <= 0) return cudaSuccess;
  return dispatch<Rmatvec>(storage, plan.vec, G, c, out, partial, m, d, plan, stream);
}

}  // namespace hf_mfac
