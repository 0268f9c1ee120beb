// Python bindings of the hf_mfac CUDA kernels (built by hf_mfac/kernels/_loader.py).
// Every entry point validates its inputs with TORCH_CHECK, switches to the inputs' device with a
// save/restore guard on the CUDA runtime API, launches on the stream passed from Python
// (torch.cuda.current_stream(device).cuda_stream) and checks the launch. Each TORCH_CHECK has its
// mirror in hf_mfac/kernels/_dispatch.py (TORCH_CHECK_MIRRORS: the why_not predicate that rejects such
// inputs, or the conversion that makes the condition hold); tests/test_kernels.py parses this file.
// No ATen/cuda or c10/cuda header is used, so this file also compiles against a CPU-only torch
// (see .ci/compile_cuda.sh).
#include <torch/extension.h>

#include <cuda_runtime.h>

#include "mfac_kernels.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "hf_mfac CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// Makes `device` current for the guard's lifetime and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = prev_;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

int multiprocessors(int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

hf_mfac::Storage check_window(const torch::Tensor& G, const char* op) {
  TORCH_CHECK(G.is_cuda(), op, ": G must be a CUDA tensor; got device ", G.device());
  TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D (m, d); got shape ", G.sizes());
  TORCH_CHECK(G.size(0) > 0 && G.size(1) > 0, op, ": G must be non-empty; got shape ", G.sizes());
  TORCH_CHECK(G.is_contiguous(), op, ": G must be contiguous (row-major (m, d))");
  const auto st = G.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16, op,
              ": G must be float32, bfloat16 or float16; got ", st);
  return st == torch::kFloat32 ? hf_mfac::Storage::kF32
                               : (st == torch::kBFloat16 ? hf_mfac::Storage::kBF16 : hf_mfac::Storage::kF16);
}

void check_vector(const torch::Tensor& v, const torch::Tensor& G, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(v.device() == G.device(), op, ": ", name, " must be on ", G.device(), "; got ", v.device());
  TORCH_CHECK(v.scalar_type() == torch::kFloat32, op, ": ", name, " must be float32; got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": ", name, " must have shape (", n, ",); got ", v.sizes());
  TORCH_CHECK(v.is_contiguous(), op, ": ", name, " must be contiguous");
}

bool aligned(const torch::Tensor& t, int bytes) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % static_cast<std::uintptr_t>(bytes) == 0;
}

// p = G x, fp32 accumulation. G (m, d) fp32/bf16/fp16, x (d,) fp32 -> (m,) fp32.
torch::Tensor window_matvec(const torch::Tensor& G, torch::Tensor x, int64_t stream) {
  const auto storage = check_window(G, "window_matvec");
  const int64_t m = G.size(0), d = G.size(1);
  check_vector(x, G, d, "window_matvec", "x");
  DeviceGuard guard(G.get_device());
  const int vec = hf_mfac::gemv_vec_width(d, static_cast<int>(G.element_size()),
                                          reinterpret_cast<std::uintptr_t>(G.data_ptr()));
  if (!aligned(x, vec * 4)) x = x.clone();  // a view at an odd offset: one copy of d floats
  const auto plan = hf_mfac::plan_window_matvec(m, d, vec, multiprocessors(G.get_device()));
  auto out = torch::empty({m}, G.options().dtype(torch::kFloat32));
  torch::Tensor partial;
  if (plan.splits > 1) partial = torch::empty({plan.splits, m}, out.options());
  check_cuda(hf_mfac::launch_window_matvec(storage, G.data_ptr(), x.data_ptr<float>(), out.data_ptr<float>(),
                                           plan.splits > 1 ? partial.data_ptr<float>() : nullptr, m, d, plan,
                                           as_stream(stream)),
             "window_matvec launch");
  return out;
}

// y = G^T c, fp32 accumulation. G (m, d) fp32/bf16/fp16, c (m,) fp32 -> (d,) fp32.
torch::Tensor window_rmatvec(const torch::Tensor& G, const torch::Tensor& c, int64_t stream) {
  const auto storage = check_window(G, "window_rmatvec");
  const int64_t m = G.size(0), d = G.size(1);
  check_vector(c, G, m, "window_rmatvec", "c");
  DeviceGuard guard(G.get_device());
  const int vec = hf_mfac::gemv_vec_width(d, static_cast<int>(G.element_size()),
                                          reinterpret_cast<std::uintptr_t>(G.data_ptr()));
  const auto plan = hf_mfac::plan_window_rmatvec(m, d, vec, multiprocessors(G.get_device()));
  auto out = torch::empty({d}, G.options().dtype(torch::kFloat32));
  torch::Tensor partial;
  if (plan.splits > 1) partial = torch::empty({plan.splits, d}, out.options());
  check_cuda(hf_mfac::launch_window_rmatvec(storage, G.data_ptr(), c.data_ptr<float>(), out.data_ptr<float>(),
                                            plan.splits > 1 ? partial.data_ptr<float>() : nullptr, m, d, plan,
                                            as_stream(stream)),
             "window_rmatvec launch");
  return out;
}

// B = (I + L)^{-1} / damp from D ([M-FAC, App. B, Alg. 1]). D (m, m) fp32/fp64 -> B (m, m).
torch::Tensor mfac_b(const torch::Tensor& D, double damp, double scale, int64_t stream) {
  TORCH_CHECK(D.is_cuda(), "mfac_b: D must be a CUDA tensor; got device ", D.device());
  TORCH_CHECK(D.dim() == 2 && D.size(0) == D.size(1) && D.size(0) > 0, "mfac_b: D must be square (m, m); got ",
              D.sizes());
  TORCH_CHECK(D.is_contiguous(), "mfac_b: D must be contiguous");
  TORCH_CHECK(D.scalar_type() == torch::kFloat32 || D.scalar_type() == torch::kFloat64,
              "mfac_b: D must be float32 or float64; got ", D.scalar_type());
  TORCH_CHECK(damp > 0 && scale >= 0, "mfac_b: need damp > 0 and scale >= 0; got damp=", damp, " scale=", scale);
  const int64_t m = D.size(0);
  TORCH_CHECK(hf_mfac::ceil_div(m, hf_mfac::kBTile) <= 65535, "mfac_b: m=", m, " exceeds the kernel's limit of ",
              int64_t{65535} * hf_mfac::kBTile);
  DeviceGuard guard(D.get_device());
  auto B = torch::zeros_like(D);
  cudaError_t err;
  if (D.scalar_type() == torch::kFloat32)
    err = hf_mfac::launch_mfac_b(D.data_ptr<float>(), B.data_ptr<float>(), m, damp, scale, as_stream(stream));
  else
    err = hf_mfac::launch_mfac_b(D.data_ptr<double>(), B.data_ptr<double>(), m, damp, scale, as_stream(stream));
  check_cuda(err, "mfac_b launch");
  return B;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "hf_mfac CUDA kernels (see hf_mfac.kernels for the public ops and their torch references)";
  module.def("window_matvec", &window_matvec, "p = G @ x with fp32 accumulation", pybind11::arg("G"),
             pybind11::arg("x"), pybind11::arg("stream"));
  module.def("window_rmatvec", &window_rmatvec, "y = G^T @ c with fp32 accumulation", pybind11::arg("G"),
             pybind11::arg("c"), pybind11::arg("stream"));
  module.def("mfac_b", &mfac_b, "M-FAC coefficient matrix B from D (tiled, [M-FAC, App. B])",
             pybind11::arg("D"), pybind11::arg("damp"), pybind11::arg("scale"), pybind11::arg("stream"));
}
