// The M-FAC coefficient matrix B ([M-FAC, App. B, Alg. 1], second loop; [M-FAC, App. B, Fig. 3]):
//   B = (I + L)^{-1} / damp,   L[i, j] = D[j, i] / (scale + D[j, j])  for i > j   (scale = m in the paper)
// i.e. the inverse of a unit lower-triangular matrix, computed in 32x32 tiles B_IJ (I >= J):
//   1. all diagonal tiles at once:     B_II = L_II^{-1} / damp                     (mfac_b_diag_kernel)
//   2. for t = 1 .. nb-1, one launch:  every tile on sub-diagonal o >= t adds L_IK B_KJ, K = J + t - 1
//      (K lies on the sub-diagonal t - 1 finished by the previous launch); the tiles on
//      sub-diagonal t then hold the whole sum and finish as B_IJ = -(damp B_II) (sum_K L_IK B_KJ).
// nb = ceil(m / 32) launches in all, O(m^3 / 6) multiply-adds, O(m^2) memory; any m (edge tiles are
// padded with zeros). D is read through its upper triangle only; B must be zero on entry.
#include "mfac_kernels.h"

namespace hf_mfac {
namespace {

constexpr int T = kBTile;    // tile edge
constexpr int kRowsPer = 4;  // rows per thread in the update kernel: block (32, 8)

// L tile (I, K): Ls[i][k] = L[I*T + i, K*T + k] = D[K*T + k, I*T + i] / (scale + D[K*T + k, K*T + k]).
// Read coalesced along i (a row of D), stored transposed; the padding column avoids bank conflicts.
template <typename S>
__device__ __forceinline__ void load_l_tile(S (&Ls)[T][T + 1], const S* __restrict__ D, int64_t m, int64_t I,
                                            int64_t K, S scale, bool strict_lower) {
  __shared__ S inv_u[T];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t gi = I * T + tx;
  if (ty == 0) {
    const int64_t gk = K * T + tx;
    inv_u[tx] = gk < m ? S(1) / (scale + D[gk * m + gk]) : S(0);
  }
  __syncthreads();
  for (int k = ty; k < T; k += blockDim.y) {
    const int64_t gk = K * T + k;
    const bool keep = gi < m && gk < m && (!strict_lower || tx > k);
    Ls[tx][k] = keep ? D[gk * m + gi] * inv_u[k] : S(0);
  }
}

// One warp per diagonal tile: lane j solves column j of L_II X = I by forward substitution.
template <typename S>
__global__ void __launch_bounds__(T) mfac_b_diag_kernel(const S* __restrict__ D, S* __restrict__ B, int64_t m,
                                                        S damp, S scale) {
  __shared__ S Ls[T][T + 1];
  __shared__ S X[T][T + 1];
  const int64_t I = blockIdx.x;
  load_l_tile(Ls, D, m, I, I, scale, /*strict_lower=*/true);
  __syncthreads();
  const int j = threadIdx.x;
  for (int i = 0; i < T; ++i) {
    S v = S(i == j);
    if (i > j) {
      for (int k = j; k < i; ++k) v -= Ls[i][k] * X[k][j];  // Ls[i][k] is a broadcast
    }
    X[i][j] = v;
  }
  const int64_t gj = I * T + j;
  if (gj >= m) return;
  for (int i = j; i < T; ++i) {
    const int64_t gi = I * T + i;
    if (gi < m) B[gi * m + gj] = X[i][j] / damp;
  }
}

// Launch t (1 <= t < nb): block (x, y) is tile (I, J) = (J + t + y, x) when I < nb.
template <typename S>
__global__ void __launch_bounds__(T * T / kRowsPer) mfac_b_update_kernel(const S* __restrict__ D, S* __restrict__ B,
                                                                      int64_t m, int64_t nb, int64_t t, S damp,
                                                                      S scale) {
  const int64_t J = blockIdx.x, I = J + t + blockIdx.y;
  if (I >= nb) return;
  const int64_t K = J + t - 1;
  __shared__ S Ls[T][T + 1];
  __shared__ S Bs[T][T + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  load_l_tile(Ls, D, m, I, K, scale, /*strict_lower=*/false);
  const int64_t gj = J * T + tx;
  for (int k = ty; k < T; k += blockDim.y) {
    const int64_t gk = K * T + k;
    Bs[k][tx] = gk < m && gj < m ? B[gk * m + gj] : S(0);
  }
  __syncthreads();
  S acc[kRowsPer];
#pragma unroll
  for (int r = 0; r < kRowsPer; ++r) {
    const int64_t gi = I * T + ty + r * blockDim.y;
    acc[r] = gi < m && gj < m ? B[gi * m + gj] : S(0);  // running sum over K' < K (zero at t = 1)
  }
#pragma unroll 8
  for (int k = 0; k < T; ++k) {
    const S b = Bs[k][tx];
#pragma unroll
    for (int r = 0; r < kRowsPer; ++r) acc[r] += Ls[ty + r * blockDim.y][k] * b;
  }
  if (blockIdx.y == 0) {  // tile (J + t, J) is complete: multiply by -L_II^{-1} = -(damp B_II)
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPer; ++r) Bs[ty + r * blockDim.y][tx] = acc[r];
    for (int i = ty; i < T; i += blockDim.y) {
      const int64_t gi = I * T + i, gk = I * T + tx;
      Ls[i][tx] = gi < m && gk < m ? damp * B[gi * m + gk] : S(0);  // lower triangular, zeros above
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPer; ++r) {
      const int i = ty + r * blockDim.y;
      S v = S(0);
      for (int k = 0; k <= i; ++k) v -= Ls[i][k] * Bs[k][tx];
      acc[r] = v;
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPer; ++r) {
    const int64_t gi = I * T + ty + r * blockDim.y;
    if (gi < m && gj < m) B[gi * m + gj] = acc[r];
  }
}

template <typename S>
cudaError_t mfac_b_typed(const S* D, S* B, int64_t m, double damp, double scale, cudaStream_t stream) {
  if (m <= 0) return cudaSuccess;
  const int64_t nb = ceil_div(m, T);
  if (nb > 65535) return cudaErrorInvalidValue;  // grid.y limit; m <= 2,097,120
  mfac_b_diag_kernel<S><<<static_cast<unsigned>(nb), T, 0, stream>>>(D, B, m, S(damp), S(scale));
  cudaError_t err = cudaGetLastError();
  const dim3 block(T, T / kRowsPer);
  for (int64_t t = 1; t < nb && err == cudaSuccess; ++t) {
    const dim3 grid(static_cast<unsigned>(nb - t), static_cast<unsigned>(nb - t));
    mfac_b_update_kernel<S><<<grid, block, 0, stream>>>(D, B, m, nb, t, S(damp), S(scale));
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t launch_mfac_b(const float* D, float* B, int64_t m, double damp, double scale, cudaStream_t stream) {
  return mfac_b_typed<float>(D, B, m, damp, scale, stream);
}

cudaError_t launch_mfac_b(const double* D, double* B, int64_t m, double damp, double scale, cudaStream_t stream) {
  return mfac_b_typed<double>(D, B, m, damp, scale, stream);
}

}  // namespace hf_mfac
