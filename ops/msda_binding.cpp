// Python binding of the multi-scale deformable attention kernels (msda_kernel.cu), used by
// ops/msda.py through torch.utils.cpp_extension.load.
// Only torch/extension.h and the CUDA runtime are included (no c10/cuda or ATen/cuda header), so
// this file also compiles against a CPU-only torch: the caller sets the device (torch.cuda.device)
// and passes the current stream as an integer (torch.cuda.current_stream().cuda_stream).
#include <torch/extension.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "msda.h"

namespace {

void check_tensor(const torch::Tensor& t, const char* name, const torch::Tensor& value) {
  TORCH_CHECK(t.is_cuda(), "ms_deform_attn: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              ", value on ", value.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

// Checks the inputs and returns the sizes (shapes themselves are checked in Python).
MsdaSizes check_inputs(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                       const torch::Tensor& level_start_index, const torch::Tensor& loc,
                       const torch::Tensor& attn) {
  check_tensor(value, "value", value);
  check_tensor(spatial_shapes, "spatial_shapes", value);
  check_tensor(level_start_index, "level_start_index", value);
  check_tensor(loc, "sampling_locations", value);
  check_tensor(attn, "attention_weights", value);
  TORCH_CHECK(value.scalar_type() == torch::kFloat || value.scalar_type() == torch::kDouble,
              "ms_deform_attn kernel: float32 or float64 expected, got ", value.scalar_type());
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "ms_deform_attn kernel: value, sampling_locations and attention_weights must share a dtype");
  TORCH_CHECK(spatial_shapes.scalar_type() == torch::kLong &&
                  level_start_index.scalar_type() == torch::kLong,
              "ms_deform_attn kernel: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5,
              "ms_deform_attn kernel: value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2], "
              "attention_weights [B, Q, M, L, P] expected");
  return MsdaSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                   loc.size(3),   loc.size(1),   loc.size(4)};
}

cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn ", what, " kernel launch failed: ",
              cudaGetErrorString(err));
}

template <typename T>
cudaError_t launch_forward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                           const torch::Tensor& level_start_index, const torch::Tensor& loc,
                           const torch::Tensor& attn, torch::Tensor& out, MsdaSizes n,
                           cudaStream_t stream) {
  return msda_forward_cuda<T>(value.data_ptr<T>(), spatial_shapes.data_ptr<int64_t>(),
                              level_start_index.data_ptr<int64_t>(), loc.data_ptr<T>(),
                              attn.data_ptr<T>(), out.data_ptr<T>(), n, stream);
}

template <typename T>
cudaError_t launch_backward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                            const torch::Tensor& level_start_index, const torch::Tensor& loc,
                            const torch::Tensor& attn, const torch::Tensor& grad_out,
                            torch::Tensor& grad_value, torch::Tensor& grad_loc,
                            torch::Tensor& grad_attn, MsdaSizes n, cudaStream_t stream) {
  return msda_backward_cuda<T>(value.data_ptr<T>(), spatial_shapes.data_ptr<int64_t>(),
                               level_start_index.data_ptr<int64_t>(), loc.data_ptr<T>(),
                               attn.data_ptr<T>(), grad_out.data_ptr<T>(), grad_value.data_ptr<T>(),
                               grad_loc.data_ptr<T>(), grad_attn.data_ptr<T>(), n, stream);
}

// -> [B, Q, M * D]
torch::Tensor forward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                      const torch::Tensor& level_start_index, const torch::Tensor& loc,
                      const torch::Tensor& attn, int64_t stream) {
  const MsdaSizes n = check_inputs(value, spatial_shapes, level_start_index, loc, attn);
  torch::Tensor out = torch::empty({n.B, n.Q, n.M * n.D}, value.options());
  const cudaError_t err =
      value.scalar_type() == torch::kDouble
          ? launch_forward<double>(value, spatial_shapes, level_start_index, loc, attn, out, n,
                                   as_stream(stream))
          : launch_forward<float>(value, spatial_shapes, level_start_index, loc, attn, out, n,
                                  as_stream(stream));
  check_launch(err, "forward");
  return out;
}

// -> (grad_value, grad_sampling_locations, grad_attention_weights)
std::vector<torch::Tensor> backward(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                                    const torch::Tensor& level_start_index,
                                    const torch::Tensor& loc, const torch::Tensor& attn,
                                    const torch::Tensor& grad_out, int64_t stream) {
  const MsdaSizes n = check_inputs(value, spatial_shapes, level_start_index, loc, attn);
  check_tensor(grad_out, "grad_out", value);
  TORCH_CHECK(grad_out.scalar_type() == value.scalar_type() && grad_out.numel() == n.B * n.Q * n.M * n.D,
              "ms_deform_attn backward: grad_out must be [B, Q, M * D] in value's dtype");
  // zero-filled: the kernel accumulates with atomicAdd
  torch::Tensor grad_value = torch::zeros_like(value);
  torch::Tensor grad_loc = torch::zeros_like(loc);
  torch::Tensor grad_attn = torch::zeros_like(attn);
  const cudaError_t err =
      value.scalar_type() == torch::kDouble
          ? launch_backward<double>(value, spatial_shapes, level_start_index, loc, attn, grad_out,
                                    grad_value, grad_loc, grad_attn, n, as_stream(stream))
          : launch_backward<float>(value, spatial_shapes, level_start_index, loc, attn, grad_out,
                                   grad_value, grad_loc, grad_attn, n, as_stream(stream));
  check_launch(err, "backward");
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention CUDA kernels (see ops/msda.py)";
  m.def("forward", &forward, "MSDA forward -> [B, Q, M*D]");
  m.def("backward", &backward, "MSDA backward -> (grad_value, grad_locations, grad_weights)");
}
