// Launchers for the hf_mfac CUDA kernels. Host-only declarations on plain pointers and the CUDA
// runtime API, so this header compiles with nvcc (the .cu files) and with g++ (mfac_ext.cpp) without
// any ATen/c10 CUDA header. Input validation (TORCH_CHECK) lives in mfac_ext.cpp; the Python-side
// predicates in hf_mfac/kernels/_dispatch.py (supports()) state the same limits.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hf_mfac {

// Storage dtype of the gradient window G.
enum class Storage : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kGemvThreads = 256;  // threads per block of both window kernels
constexpr int kMatvecRows = 4;     // rows of G per block in window_matvec (x is reused across them)
constexpr int kBTile = 32;         // tile edge of the B kernel ([M-FAC, App. B])

// How a window kernel splits its work: `vec` elements per load (16 bytes when aligned), and
// `splits` slices of the reduced dimension (d for G x, m for G^T c), each `chunk` long. With
// splits > 1 the kernel writes fp32 partial sums (splits, n) that a second kernel adds in a fixed
// order, so results are deterministic (no atomics).
struct GemvPlan {
  int vec;
  int64_t splits;
  int64_t chunk;
};

// Largest power-of-two vector width (in elements, at most 16 bytes) that divides the row length d
// and the base address, so that every row start is aligned.
inline int gemv_vec_width(int64_t d, int elem_bytes, std::uintptr_t base) {
  int vec = 16 / elem_bytes;
  while (vec > 1 && (d % vec != 0 || base % (static_cast<std::uintptr_t>(vec) * elem_bytes) != 0)) vec /= 2;
  return vec;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// p = G x: blocks of kMatvecRows rows; split d until there are about 8 blocks per SM, keeping at
// least 4 vector loads per thread in each slice.
inline GemvPlan plan_window_matvec(int64_t m, int64_t d, int vec, int sms) {
  const int64_t groups = ceil_div(m, kMatvecRows);
  const int64_t want = ceil_div(int64_t{8} * sms, groups);
  const int64_t most = d / (int64_t{4} * kGemvThreads * vec);
  int64_t splits = want < most ? want : most;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  const int64_t chunk = ceil_div(ceil_div(d, splits), vec) * vec;
  return GemvPlan{vec, ceil_div(d, chunk), chunk};
}

// y = G^T c: each thread owns `vec` columns; split the m rows until there are about 8 blocks per
// SM, keeping at least 32 rows per slice.
inline GemvPlan plan_window_rmatvec(int64_t m, int64_t d, int vec, int sms) {
  const int64_t cols = ceil_div(d, int64_t{kGemvThreads} * vec);
  const int64_t want = ceil_div(int64_t{8} * sms, cols);
  const int64_t most = m / 32;
  int64_t splits = want < most ? want : most;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  const int64_t chunk = ceil_div(m, splits);
  return GemvPlan{vec, ceil_div(m, chunk), chunk};
}

// out (m,) fp32 = G (m, d) x (d,) fp32, fp32 accumulation; `partial` holds plan.splits * m floats
// when plan.splits > 1 (else unused). G, x, out must be aligned to plan.vec elements.
cudaError_t launch_window_matvec(Storage storage, const void* G, const float* x, float* out, float* partial,
                                 int64_t m, int64_t d, const GemvPlan& plan, cudaStream_t stream);

// out (d,) fp32 = G (m, d)^T c (m,) fp32, fp32 accumulation; `partial` holds plan.splits * d floats
// when plan.splits > 1.
cudaError_t launch_window_rmatvec(Storage storage, const void* G, const float* c, float* out, float* partial,
                                  int64_t m, int64_t d, const GemvPlan& plan, cudaStream_t stream);

// [M-FAC, App. B, Alg. 1], second loop, as the tiled kernel of [M-FAC, App. B]: B (m, m), lower triangular,
// B = (I + L)^{-1} / damp with L[i, j] = D[j, i] / (scale + D[j, j]) for i > j. D (m, m) row-major, only
// its upper triangle is read. B must be zero-filled on entry (its strictly upper triangle stays 0).
cudaError_t launch_mfac_b(const float* D, float* B, int64_t m, double damp, double scale, cudaStream_t stream);
cudaError_t launch_mfac_b(const double* D, double* B, int64_t m, double damp, double scale, cudaStream_t stream);

}  // namespace hf_mfac
