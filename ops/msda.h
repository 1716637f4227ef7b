// Multi-scale deformable attention: the CUDA launchers (msda_kernel.cu) that the binding
// (msda_binding.cpp) calls. Plain pointers and sizes only, so the kernel file needs no torch header.
// Layouts (all contiguous): value [B, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L],
// sampling_locations [B, Q, M, L, P, 2] (x, y in [0, 1]), attention_weights [B, Q, M, L, P],
// out / grad_out [B, Q, M, D]. The gradients must be zero-filled by the caller (atomicAdd).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

struct MsdaSizes {
  int64_t B, S, M, D, L, Q, P;
};

template <typename T>
cudaError_t msda_forward_cuda(const T* value, const int64_t* spatial_shapes,
                              const int64_t* level_start_index, const T* sampling_locations,
                              const T* attention_weights, T* out, MsdaSizes n, cudaStream_t stream);

template <typename T>
cudaError_t msda_backward_cuda(const T* value, const int64_t* spatial_shapes,
                               const int64_t* level_start_index, const T* sampling_locations,
                               const T* attention_weights, const T* grad_out, T* grad_value,
                               T* grad_sampling_locations, T* grad_attention_weights,
                               MsdaSizes n, cudaStream_t stream);
