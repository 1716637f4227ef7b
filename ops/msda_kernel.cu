// Multi-scale deformable attention, forward and backward CUDA kernels (the semantics of mmcv's
// MultiScaleDeformableAttnFunction; the PyTorch fallback in msda.py gives the same numbers).
//
//   out[b, q, m, c] = sum_l sum_p A[b, q, m, l, p] * bilinear(value_l[b, :, :, m, c], x, y),
//   x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5   (pixel centres at integers; corners off the map read 0)
//
// One thread per output element (b, q, m, c), channels fastest: neighbouring threads read neighbouring
// channels of the same pixel (coalesced loads and coalesced atomicAdds into grad_value), and the D
// threads of one (b, q, m) share its sampling locations and weights. No torch header here: the binding
// (msda_binding.cpp) hands over raw pointers, the sizes and the stream.
#include "msda.h"

namespace {

constexpr int kThreads = 256;       // a multiple of the warp size: the backward's shuffles need whole warps
constexpr int64_t kMaxBlocks = 65536;
constexpr unsigned kFullMask = 0xffffffffu;

// The four corners of one bilinear sample, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename T>
struct Corners {
  T lx, ly;        // position inside the cell, in [0, 1)
  T v[4];          // corner values, 0 off the map
  int64_t off[4];  // corner offsets from the level's first pixel (in elements), -1 off the map
};

// Fills `s` for a sample at pixel coordinates (x, y) of an H x W level whose pixels are `stride`
// elements apart; returns false when no corner lies on the map (then the sample is 0; also for NaN).
template <typename T>
__device__ __forceinline__ bool gather_corners(const T* level, int64_t H, int64_t W, int64_t stride,
                                               T x, T y, Corners<T>& s) {
  if (!(x > T(-1) && y > T(-1) && x < T(W) && y < T(H))) return false;
  const T fx = floor(x), fy = floor(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  s.lx = x - fx;
  s.ly = y - fy;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t xi = x0 + (k & 1), yi = y0 + (k >> 1);
    const bool on_map = xi >= 0 && xi < W && yi >= 0 && yi < H;
    s.off[k] = on_map ? (yi * W + xi) * stride : -1;
    s.v[k] = on_map ? level[s.off[k]] : T(0);
  }
  return true;
}

template <typename T>
__global__ void msda_forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                                    const int64_t* __restrict__ starts, const T* __restrict__ loc,
                                    const T* __restrict__ attn, T* __restrict__ out, MsdaSizes n) {
  const int64_t total = n.B * n.Q * n.M * n.D;
  const int64_t stride = n.M * n.D;  // between neighbouring pixels of value
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = i % n.D, bqm = i / n.D;  // bqm = (b * Q + q) * M + m
    const int64_t m = bqm % n.M, b = bqm / (n.M * n.Q);
    const T* v = value + (b * n.S * n.M + m) * n.D + c;  // value[b, 0, m, c]
    const T* a = attn + bqm * n.L * n.P;                 // attention_weights[b, q, m, 0, 0]
    const T* xy = loc + bqm * n.L * n.P * 2;             // sampling_locations[b, q, m, 0, 0, :]
    T acc = 0;
    for (int64_t l = 0; l < n.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const T* level = v + starts[l] * stride;
      for (int64_t p = 0; p < n.P; ++p, ++a, xy += 2) {
        Corners<T> s;
        if (!gather_corners(level, H, W, stride, xy[0] * W - T(0.5), xy[1] * H - T(0.5), s)) continue;
        const T top = (1 - s.lx) * s.v[0] + s.lx * s.v[1];
        const T bottom = (1 - s.lx) * s.v[2] + s.lx * s.v[3];
        acc += *a * ((1 - s.ly) * top + s.ly * bottom);
      }
    }
    out[i] = acc;  // out [B, Q, M, D]: i is its flat index
  }
}

// Backward. grad_value gets w_k * a * g at each corner (atomicAdd: many samples share a corner).
// grad_attn and grad_loc are sums over the D channels: each thread computes its channel's share,
// the lanes of a warp holding the same (b, q, m) add theirs with shuffles, and one lane per group
// of lanes does the atomicAdd (D > 32 spans several warps; the gradients are zero-filled first).
template <typename T>
__global__ void msda_backward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts, const T* __restrict__ loc,
                                     const T* __restrict__ attn, const T* __restrict__ grad_out,
                                     T* __restrict__ grad_value, T* __restrict__ grad_loc,
                                     T* __restrict__ grad_attn, MsdaSizes n) {
  const int64_t total = n.B * n.Q * n.M * n.D;
  const int64_t stride = n.M * n.D;
  // Lanes are grouped by `seg`, the largest power of two dividing D (at most 32): such an aligned
  // group of lanes always holds channels of one (b, q, m), and is either all active or all idle.
  int seg = static_cast<int>(n.D & -n.D);
  if (seg > 32) seg = 32;
  const int lane = threadIdx.x & 31;
  // The loop bound is the same for the whole block, so every lane reaches every shuffle.
  for (int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x); first < total;
       first += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const bool active = first + threadIdx.x < total;
    const int64_t i = active ? first + threadIdx.x : total - 1;  // idle lanes: a valid index, g = 0
    const T g = active ? grad_out[i] : T(0);
    const int64_t c = i % n.D, bqm = i / n.D;
    const int64_t m = bqm % n.M, b = bqm / (n.M * n.Q);
    const int64_t v_off = (b * n.S * n.M + m) * n.D + c;
    const int64_t k0 = bqm * n.L * n.P;  // index of attention_weights[b, q, m, 0, 0]
    for (int64_t l = 0; l < n.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const T* level = value + v_off + starts[l] * stride;
      T* grad_level = grad_value + v_off + starts[l] * stride;
      for (int64_t p = 0; p < n.P; ++p) {
        const int64_t k = k0 + l * n.P + p;
        const T a = attn[k];
        T da = 0, dx = 0, dy = 0;
        Corners<T> s;
        if (gather_corners(level, H, W, stride, loc[2 * k] * W - T(0.5), loc[2 * k + 1] * H - T(0.5),
                           s)) {
          const T w[4] = {(1 - s.ly) * (1 - s.lx), (1 - s.ly) * s.lx, s.ly * (1 - s.lx), s.ly * s.lx};
          const T ag = a * g;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (active && s.off[j] >= 0) atomicAdd(grad_level + s.off[j], w[j] * ag);
          }
          da = g * (w[0] * s.v[0] + w[1] * s.v[1] + w[2] * s.v[2] + w[3] * s.v[3]);
          // chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5
          dx = ag * W * ((1 - s.ly) * (s.v[1] - s.v[0]) + s.ly * (s.v[3] - s.v[2]));
          dy = ag * H * ((1 - s.lx) * (s.v[2] - s.v[0]) + s.lx * (s.v[3] - s.v[1]));
        }
        for (int offset = seg / 2; offset > 0; offset /= 2) {
          da += __shfl_xor_sync(kFullMask, da, offset);
          dx += __shfl_xor_sync(kFullMask, dx, offset);
          dy += __shfl_xor_sync(kFullMask, dy, offset);
        }
        if (active && (lane & (seg - 1)) == 0) {
          atomicAdd(grad_attn + k, da);
          atomicAdd(grad_loc + 2 * k, dx);
          atomicAdd(grad_loc + 2 * k + 1, dy);
        }
      }
    }
  }
}

int64_t blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;  // the kernels stride over the rest
}

}  // namespace

template <typename T>
cudaError_t msda_forward_cuda(const T* value, const int64_t* spatial_shapes,
                              const int64_t* level_start_index, const T* sampling_locations,
                              const T* attention_weights, T* out, MsdaSizes n, cudaStream_t stream) {
  const int64_t total = n.B * n.Q * n.M * n.D;
  if (total == 0) return cudaSuccess;
  msda_forward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t msda_backward_cuda(const T* value, const int64_t* spatial_shapes,
                               const int64_t* level_start_index, const T* sampling_locations,
                               const T* attention_weights, const T* grad_out, T* grad_value,
                               T* grad_sampling_locations, T* grad_attention_weights,
                               MsdaSizes n, cudaStream_t stream) {
  const int64_t total = n.B * n.Q * n.M * n.D;
  if (total == 0) return cudaSuccess;
  msda_backward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out,
      grad_value, grad_sampling_locations, grad_attention_weights, n);
  return cudaGetLastError();
}

// The two dtypes the binding dispatches (half is computed in float32 by the Python wrapper).
template cudaError_t msda_forward_cuda<float>(const float*, const int64_t*, const int64_t*,
                                              const float*, const float*, float*, MsdaSizes,
                                              cudaStream_t);
template cudaError_t msda_forward_cuda<double>(const double*, const int64_t*, const int64_t*,
                                               const double*, const double*, double*, MsdaSizes,
                                               cudaStream_t);
template cudaError_t msda_backward_cuda<float>(const float*, const int64_t*, const int64_t*,
                                               const float*, const float*, const float*, float*,
                                               float*, float*, MsdaSizes, cudaStream_t);
template cudaError_t msda_backward_cuda<double>(const double*, const int64_t*, const int64_t*,
                                                const double*, const double*, const double*,
                                                double*, double*, double*, MsdaSizes,
                                                cudaStream_t);
