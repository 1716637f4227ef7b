// Multi-scale deformable attention on the CPU: the forward and backward of ops/msda.py's op in one
// pass over the sampling points, without the PyTorch fallback's [.., D, Q, P] copies of the sampled
// values. Plain C++ with no torch header (it compiles in about a second): ops/msda.py builds it with
// the system's C++ compiler on first use, loads it with ctypes and splits the heads over threads.
//
// Layouts (all contiguous, row-major): value [B, S, M, D], spatial_shapes [L, 2] (H, W),
// level_start_index [L], loc [B, Q, M, L, P, 2] (x, y in [0, 1] across the map), attn [B, Q, M, L, P],
// out and grad_out [B, Q, M, D]. A call computes the heads m_begin <= m < m_end of every sample and
// query, in the layout's order (loc, attn and out are read and written front to back). A head reads,
// and in the backward writes, only value[:, :, m, :], so calls on disjoint heads run in parallel
// without locks, and each sums in a fixed order: the result does not depend on the thread count.
//
// Bilinear sampling as grid_sample(align_corners=False, padding_mode='zeros'): the point sits at
// pixel coordinates x = loc_x * W - 0.5, y = loc_y * H - 0.5; its four corners weigh
// (1 - |x - cx|)(1 - |y - cy|) and read zero outside the map.
#include <cstdint>
#include <vector>

namespace {

// The four corners of one sampling point, in the order (x0, y0), (x1, y0), (x0, y1), (x1, y1): the
// value row each reads (a row of zeros outside the map), its bilinear weight and the weight's
// derivatives along x and y (pixel units).
template <typename T>
struct Corners {
  const T* row[4];
  int64_t offset[4];  // row's offset in value, or -1 outside the map
  T w[4], dw_dx[4], dw_dy[4];
};

// False when no corner touches the map (or a coordinate is NaN): the point adds nothing.
// `head` points at value[b, level start, m, 0]; rows of one level are `stride` = M * D apart.
template <typename T>
inline bool find_corners(T loc_x, T loc_y, int64_t H, int64_t W, const T* head, int64_t head_offset,
                         int64_t stride, const T* zeros, Corners<T>& c) {
  const T x = loc_x * W - T(0.5), y = loc_y * H - T(0.5);
  if (!(x > T(-1) && y > T(-1) && x < T(W) && y < T(H))) return false;
  int64_t x0 = static_cast<int64_t>(x), y0 = static_cast<int64_t>(y);  // floor: truncate, then
  x0 -= x0 > x;                                                         // one down below zero
  y0 -= y0 > y;
  const T fx = x - T(x0), fy = y - T(y0);
  for (int k = 0; k < 4; ++k) {
    const int dx = k & 1, dy = k >> 1;
    const int64_t cx = x0 + dx, cy = y0 + dy;
    const T wx = dx ? fx : 1 - fx, wy = dy ? fy : 1 - fy;
    const bool inside = cx >= 0 && cx < W && cy >= 0 && cy < H;
    const int64_t offset = (cy * W + cx) * stride;
    c.row[k] = inside ? head + offset : zeros;
    c.offset[k] = inside ? head_offset + offset : -1;
    c.w[k] = inside ? wx * wy : T(0);
    c.dw_dx[k] = dx ? wy : -wy;
    c.dw_dy[k] = dy ? wx : -wx;
  }
  return true;
}

template <typename T>
void forward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
             const T* attn, T* out, int64_t B, int64_t S, int64_t M, int64_t D, int64_t L,
             int64_t Q, int64_t P, int64_t m_begin, int64_t m_end) {
  const std::vector<T> zeros(D, T(0));
  Corners<T> c;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t m = m_begin; m < m_end; ++m) {
        const int64_t bqm = (b * Q + q) * M + m;
        T* o = out + bqm * D;                                          // out[b, q, m, :]
        for (int64_t d = 0; d < D; ++d) o[d] = 0;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t head_offset = ((b * S + starts[l]) * M + m) * D;  // value[b, start_l, m, 0]
          for (int64_t p = 0; p < P; ++p) {
            const int64_t point = (bqm * L + l) * P + p;
            if (!find_corners(loc[2 * point], loc[2 * point + 1], shapes[2 * l], shapes[2 * l + 1],
                              value + head_offset, head_offset, M * D, zeros.data(), c))
              continue;
            const T a = attn[point];
            const T w0 = a * c.w[0], w1 = a * c.w[1], w2 = a * c.w[2], w3 = a * c.w[3];
            const T *v0 = c.row[0], *v1 = c.row[1], *v2 = c.row[2], *v3 = c.row[3];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d)
              o[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
          }
        }
      }
}

// grad_value must be zero on entry (it is accumulated); grad_loc and grad_attn are written.
template <typename T>
void backward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
              const T* attn, const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn,
              int64_t B, int64_t S, int64_t M, int64_t D, int64_t L, int64_t Q, int64_t P,
              int64_t m_begin, int64_t m_end) {
  const std::vector<T> zeros(D, T(0));
  std::vector<T> scratch(D);          // where the gradient of a corner outside the map goes
  Corners<T> c;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t m = m_begin; m < m_end; ++m) {
        const int64_t bqm = (b * Q + q) * M + m;
        const T* g = grad_out + bqm * D;                               // grad_out[b, q, m, :]
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const int64_t head_offset = ((b * S + starts[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t point = (bqm * L + l) * P + p;
            const T a = attn[point];
            if (!find_corners(loc[2 * point], loc[2 * point + 1], H, W, value + head_offset,
                              head_offset, M * D, zeros.data(), c)) {
              grad_attn[point] = grad_loc[2 * point] = grad_loc[2 * point + 1] = 0;
              continue;
            }
            const T *v0 = c.row[0], *v1 = c.row[1], *v2 = c.row[2], *v3 = c.row[3];
            T* gv[4];
            for (int k = 0; k < 4; ++k)
              gv[k] = c.offset[k] < 0 ? scratch.data() : grad_value + c.offset[k];
            T *g0 = gv[0], *g1 = gv[1], *g2 = gv[2], *g3 = gv[3];
            const T w0 = a * c.w[0], w1 = a * c.w[1], w2 = a * c.w[2], w3 = a * c.w[3];
            T d0 = 0, d1 = 0, d2 = 0, d3 = 0;                          // <grad_out, corner value>
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t d = 0; d < D; ++d) {
              const T gd = g[d];
              d0 += gd * v0[d];
              d1 += gd * v1[d];
              d2 += gd * v2[d];
              d3 += gd * v3[d];
              g0[d] += w0 * gd;
              g1[d] += w1 * gd;
              g2[d] += w2 * gd;
              g3[d] += w3 * gd;
            }
            const T dot[4] = {d0, d1, d2, d3};    // zero for corners outside the map
            T g_attn = 0, g_x = 0, g_y = 0;
            for (int k = 0; k < 4; ++k) {
              g_attn += c.w[k] * dot[k];
              g_x += c.dw_dx[k] * dot[k];
              g_y += c.dw_dy[k] * dot[k];
            }
            grad_attn[point] = g_attn;
            grad_loc[2 * point] = a * g_x * W;                         // dx / dloc_x = W
            grad_loc[2 * point + 1] = a * g_y * H;
          }
        }
      }
}

}  // namespace

// C entry points for ctypes: one per dtype and direction, the sizes after the pointers.
extern "C" {

void msda_forward_f32(const float* value, const int64_t* shapes, const int64_t* starts,
                      const float* loc, const float* attn, float* out, int64_t B, int64_t S,
                      int64_t M, int64_t D, int64_t L, int64_t Q, int64_t P, int64_t m_begin,
                      int64_t m_end) {
  forward(value, shapes, starts, loc, attn, out, B, S, M, D, L, Q, P, m_begin, m_end);
}

void msda_forward_f64(const double* value, const int64_t* shapes, const int64_t* starts,
                      const double* loc, const double* attn, double* out, int64_t B, int64_t S,
                      int64_t M, int64_t D, int64_t L, int64_t Q, int64_t P, int64_t m_begin,
                      int64_t m_end) {
  forward(value, shapes, starts, loc, attn, out, B, S, M, D, L, Q, P, m_begin, m_end);
}

void msda_backward_f32(const float* value, const int64_t* shapes, const int64_t* starts,
                       const float* loc, const float* attn, const float* grad_out,
                       float* grad_value, float* grad_loc, float* grad_attn, int64_t B, int64_t S,
                       int64_t M, int64_t D, int64_t L, int64_t Q, int64_t P, int64_t m_begin,
                       int64_t m_end) {
  backward(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, B, S, M,
           D, L, Q, P, m_begin, m_end);
}

void msda_backward_f64(const double* value, const int64_t* shapes, const int64_t* starts,
                       const double* loc, const double* attn, const double* grad_out,
                       double* grad_value, double* grad_loc, double* grad_attn, int64_t B,
                       int64_t S, int64_t M, int64_t D, int64_t L, int64_t Q, int64_t P,
                       int64_t m_begin, int64_t m_end) {
  backward(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, B, S, M,
           D, L, Q, P, m_begin, m_end);
}

}  // extern "C"
