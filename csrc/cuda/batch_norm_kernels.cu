// CUDA kernels of the BN primitives (docs/ARCHITECTURE.md section 1); the launcher contract is in
// batch_norm_kernels.cuh. Device code only: no ATen, so nvcc compiles this file alone.
//
// Work decomposition. One kernel per primitive, templated on the element type T, the vector width VEC
// (elements per 16-byte-or-narrower access) and the layout. A thread keeps a "tile" of channels fixed while
// it walks "positions", so the per-channel parameters of the tile sit in registers:
//   NCHW  a tile is one channel (grid.y; grid-stride beyond 65535 channels). A position is VEC consecutive
//         elements of one H*W plane (VEC divides H*W), so all VEC elements share the channel. Blocks are
//         (1, 256) threads; the grid.x blocks of a channel stride over its N*HW/VEC positions.
//   NHWC  a tile is blockDim.x consecutive channel-vectors of VEC channels (VEC divides C); a position is one
//         of the N*H*W rows. Blocks are (bx, by) = (min(C/VEC, 32), 256/bx): threads across channels,
//         rows across threadIdx.y and grid.x, so a warp reads contiguous memory.
// VEC is the widest of 16/8/4/2 bytes that divides the inner extent and to which every T pointer is
// aligned; otherwise 1 (scalar loads, correct for any offset). The NHWC backward kernels stop at 4 channels
// per thread to stay within 128 registers (kMaxVecNhwcBackward).
// Elementwise grids give each thread ~4 positions (many short blocks); reduction grids are at most one wave
// of resident blocks (make_plan).
//
// Reductions (bn_stats, bn_act_backward_reduce). Each thread accumulates its positions in registers
// (Welford for statistics; plain sums for the backward), a shared-memory tree over threadIdx.y combines a
// block (Chan's formula for statistics), and block b writes its per-channel partials to a workspace laid out
// [quantity][grid.x][C]. A second small kernel combines the grid.x partials of each channel the same way.
// With grid.x == 1 the main kernel writes the results itself. No atomics: results are deterministic.
//
// All element indices are int64_t.
#include "batch_norm_kernels.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace pyfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;       // threads per block of the main kernels
constexpr int kWarp = 32;           // most channel-vectors an NHWC block spans
constexpr int64_t kMaxGridY = 65535;
// Positions a thread loads before it uses the first (memory-level parallelism), per kernel.
constexpr int kStatsUnroll = 4;
constexpr int kForwardUnroll = 2;
constexpr int kBackwardReduceUnroll = 2;
constexpr int kBackwardElemtUnroll = 2;
constexpr int kFinalizeX = 32;      // finalize blocks: channels ...
constexpr int kFinalizeY = 8;       // ... x partials

struct Sizes {
  int64_t N, C, HW;
};

// ---------------------------------------------------------------------------------------------------------
// Element access

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<double> {
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// VEC elements moved as one aligned access (LDG/STG.128 for 16 bytes).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[i];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[i] = v;
}

// out[k] = p[c0 + k], or `neutral` when the optional vector is absent.
template <typename A, int NC>
__device__ __forceinline__ void load_channels(const A* p, int64_t c0, A neutral, A (&out)[NC]) {
#pragma unroll
  for (int k = 0; k < NC; ++k) out[k] = p != nullptr ? __ldg(p + c0 + k) : neutral;
}

// ---------------------------------------------------------------------------------------------------------
// Geometry: tiles of channels and the positions a thread walks in a tile (see the file comment).
// A cursor yields vector offsets (in units of VEC elements) and stays invalid once past its end.

template <Layout L, int VEC>
struct Geo;

// q, r = a / b, a % b for 0 <= a and 0 < b; 32-bit when both fit (a 64-bit division is a long subroutine).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    q = uint32_t(a) / uint32_t(b);
  } else {
    q = a / b;
  }
  r = a - q * b;
}

template <int VEC>
struct Geo<Layout::kNCHW, VEC> {
  static constexpr int kChannels = 1;  // distinct channels in one position
  int64_t C, HWv, total, start, stride, n0, hw0, dn, dhw;

  __device__ explicit Geo(const Sizes& s) : C(s.C), HWv(s.HW / VEC), total(s.N * (s.HW / VEC)) {
    start = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
    stride = int64_t(gridDim.x) * blockDim.y;
    // position j is element vector (n, hw) = (j / HWv, j % HWv); divide once, then step incrementally.
    divmod(start, HWv, n0, hw0);
    divmod(stride, HWv, dn, dhw);
  }
  __device__ int64_t num_tiles() const { return C; }
  // First channel of the thread's positions in `tile`, or -1 when the thread has no channel there.
  __device__ int64_t channel(int64_t tile) const { return tile; }

  struct Cursor {
    int64_t j, total, stride, n, hw, dn, dhw, HWv, plane_stride, base;
    __device__ bool valid() const { return j < total; }
    __device__ int64_t offset() const { return n * plane_stride + base + hw; }
    __device__ void next() {
      j += stride;
      n += dn;
      hw += dhw;
      if (hw >= HWv) {
        hw -= HWv;
        ++n;
      }
    }
  };
  __device__ Cursor cursor(int64_t tile) const {
    return Cursor{start, total, stride, n0, hw0, dn, dhw, HWv, C * HWv, tile * HWv};
  }
};

template <int VEC>
struct Geo<Layout::kNHWC, VEC> {
  static constexpr int kChannels = VEC;
  int64_t Cv, M, start, stride;

  __device__ explicit Geo(const Sizes& s) : Cv(s.C / VEC), M(s.N * s.HW) {
    start = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
    stride = int64_t(gridDim.x) * blockDim.y;
  }
  __device__ int64_t num_tiles() const { return (Cv + blockDim.x - 1) / blockDim.x; }
  __device__ int64_t channel(int64_t tile) const {
    const int64_t cv = tile * blockDim.x + threadIdx.x;
    return cv < Cv ? cv * VEC : -1;
  }

  struct Cursor {
    int64_t m, M, stride, Cv, cv;
    __device__ bool valid() const { return m < M; }
    __device__ int64_t offset() const { return m * Cv + cv; }
    __device__ void next() { m += stride; }
  };
  __device__ Cursor cursor(int64_t tile) const {
    const int64_t cv = tile * blockDim.x + threadIdx.x;
    return Cursor{cv < Cv ? start : M, M, stride, Cv, cv};
  }
};

// Takes up to U offsets from the cursor; returns how many (the valid ones come first).
template <int U, typename Cursor>
__device__ __forceinline__ int take(Cursor& cur, int64_t (&off)[U]) {
  int n = 0;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    off[u] = 0;
    if (cur.valid()) {
      off[u] = cur.offset();
      cur.next();
      ++n;
    }
  }
  return n;
}

// Walks the cursor U positions at a time: load(u, offset) for each, then use(u, offset) for each, so that U
// loads are in flight before the first is used (memory-level parallelism). Both are inlined and unrolled:
// per-position register arrays indexed by u stay in registers.
template <int U, typename Cursor, typename Load, typename Use>
__device__ __forceinline__ void walk(Cursor cur, const Load& load, const Use& use) {
  while (cur.valid()) {
    int64_t off[U];
    const int nv = take(cur, off);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < nv) load(u, off[u]);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < nv) use(u, off[u]);
  }
}

// The per-channel parameters of the pre-activation z = x*scale + shift [+ r*res_scale + res_shift] for the NC
// channels of a thread's tile, and the two things the kernels do with z.
template <typename A, int NC>
struct PreAct {
  A sc[NC], sh[NC], rsc[NC], rsh[NC];
  bool has_res, relu;

  template <typename Args>
  __device__ __forceinline__ PreAct(const Args& a, int64_t c0) : has_res(a.residual != nullptr), relu(a.relu) {
    load_channels(a.scale, c0, A(1), sc);
    load_channels(a.shift, c0, A(0), sh);
    load_channels(a.res_scale, c0, A(1), rsc);
    load_channels(a.res_shift, c0, A(0), rsh);
  }
  __device__ __forceinline__ A z(A x, A r, int k) const {
    A v = x * sc[k] + sh[k];
    if (has_res) v += r * rsc[k] + rsh[k];
    return v;
  }
  // g through the ReLU (when there was one): 0 where z <= 0; a NaN z lets it through, as threshold_backward does.
  __device__ __forceinline__ A dz(A g, A x, A r, int k) const { return relu && z(x, r, k) <= A(0) ? A(0) : g; }
};

// ---------------------------------------------------------------------------------------------------------
// Reduction helpers

// Chan's combination of (n, mean, m2) with (nb, mean_b, m2_b); either side may be empty (n == 0).
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mean_b, A m2_b) {
  const A nt = n + nb;
  const A w = nt > A(0) ? nb / nt : A(0);
  const A d = mean_b - mean;
  mean += d * w;
  m2 += m2_b + d * d * n * w;
  n = nt;
}

// Adds one position (VEC elements, K = VEC/NC per channel) to a thread's Welford states, which share the
// count `cnt`: the position's own K-element mean and M2 are merged with Chan's formula (K = 1 is Welford).
template <typename T, int VEC, int NC>
__device__ __forceinline__ void welford_add(int64_t& cnt, acc_t<T> (&mean)[NC], acc_t<T> (&m2)[NC],
                                            const Pack<T, VEC>& p) {
  using A = acc_t<T>;
  constexpr int K = VEC / NC;
  const A n_a = A(cnt);
  cnt += K;
  const A w = A(K) / A(cnt);  // weight of the new elements
  const A na_w = n_a * w;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    A v[K];
    A vm = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] = Num<T>::load(p.v[k * K + i]);
      vm += v[i];
    }
    vm *= A(1) / A(K);  // K is a power of two: exact
    A vm2 = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const A e = v[i] - vm;
      vm2 += e * e;
    }
    const A d = vm - mean[k];
    mean[k] += d * w;
    m2[k] += vm2 + d * d * na_w;
  }
}

__device__ __forceinline__ int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Combines the Welford states of the threads sharing threadIdx.x (same channels) across threadIdx.y; the
// result lands in the registers of the threadIdx.y == 0 threads. smem: blockDim.x*blockDim.y*(1+2*NC).
// Every thread of the block must call it (it synchronizes); it leaves smem free for reuse.
template <typename A, int NC>
__device__ void block_welford(A& n, A (&mean)[NC], A (&m2)[NC], A* smem) {
  const int T = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  A* sn = smem;
  A* smean = smem + T;
  A* sm2 = smem + T * (1 + NC);
  sn[tid] = n;
#pragma unroll
  for (int k = 0; k < NC; ++k) {
    smean[k * T + tid] = mean[k];
    sm2[k * T + tid] = m2[k];
  }
  __syncthreads();
  // Step s: row y < s absorbs row y + s (rows >= s are only read, rows < s only written).
  for (int s = pow2_at_least(blockDim.y) / 2; s > 0; s >>= 1) {
    if (int(threadIdx.y) < s && threadIdx.y + s < blockDim.y) {
      const int o = tid + s * blockDim.x;
      const A nb = sn[o];
      const A nt = n + nb;
      const A w = nt > A(0) ? nb / nt : A(0);
      const A na_w = n * w;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const A d = smean[k * T + o] - mean[k];
        mean[k] += d * w;
        m2[k] += sm2[k * T + o] + d * d * na_w;
        smean[k * T + tid] = mean[k];
        sm2[k * T + tid] = m2[k];
      }
      n = nt;
      sn[tid] = n;
    }
    __syncthreads();
  }
}

// Sums NS values per thread across threadIdx.y, like block_welford. smem: blockDim.x*blockDim.y*NS.
template <typename A, int NS>
__device__ void block_sum(A (&v)[NS], A* smem) {
  const int T = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < NS; ++k) smem[k * T + tid] = v[k];
  __syncthreads();
  for (int s = pow2_at_least(blockDim.y) / 2; s > 0; s >>= 1) {
    if (int(threadIdx.y) < s && threadIdx.y + s < blockDim.y) {
      const int o = tid + s * blockDim.x;
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        v[k] += smem[k * T + o];
        smem[k * T + tid] = v[k];
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_stats

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads)
    bn_stats_kernel(const BnStatsArgs<T> a, const Sizes s, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  using G = Geo<L, VEC>;
  constexpr int NC = G::kChannels;
  __shared__ A smem[kThreads * (1 + 2 * NC)];
  const G g(s);
  const int64_t P = gridDim.x;
  for (int64_t tile = blockIdx.y; tile < g.num_tiles(); tile += gridDim.y) {
    const int64_t c0 = g.channel(tile);
    int64_t cnt = 0;
    A mean[NC], m2[NC];
#pragma unroll
    for (int k = 0; k < NC; ++k) mean[k] = m2[k] = A(0);
    Pack<T, VEC> xp[kStatsUnroll];
    walk<kStatsUnroll>(
        g.cursor(tile), [&](int u, int64_t off) { xp[u] = load_pack<T, VEC>(a.x, off); },
        [&](int u, int64_t) { welford_add<T, VEC, NC>(cnt, mean, m2, xp[u]); });
    A n = A(cnt);
    block_welford<A, NC>(n, mean, m2, smem);
    if (threadIdx.y == 0 && c0 >= 0) {
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int64_t c = c0 + k;
        if (P == 1) {
          a.mean[c] = mean[k];
          a.var[c] = m2[k] / n;
        } else {
          ws[(0 * P + blockIdx.x) * s.C + c] = n;
          ws[(1 * P + blockIdx.x) * s.C + c] = mean[k];
          ws[(2 * P + blockIdx.x) * s.C + c] = m2[k];
        }
      }
    }
  }
}

// Combines the P partial (n, mean, m2) of each channel: ws is [3][P][C].
template <typename A>
__global__ void __launch_bounds__(kFinalizeX* kFinalizeY)
    bn_stats_finalize_kernel(const A* __restrict__ ws, int64_t P, int64_t C, A* __restrict__ mean_out,
                             A* __restrict__ var_out) {
  __shared__ A smem[kFinalizeX * kFinalizeY * 3];
  const int64_t blocks = (C + kFinalizeX - 1) / kFinalizeX;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t c = b * kFinalizeX + threadIdx.x;
    A n = A(0), mean[1] = {A(0)}, m2[1] = {A(0)};
    if (c < C) {
      for (int64_t p = threadIdx.y; p < P; p += blockDim.y)
        chan_merge(n, mean[0], m2[0], ws[p * C + c], ws[(P + p) * C + c], ws[(2 * P + p) * C + c]);
    }
    block_welford<A, 1>(n, mean, m2, smem);
    if (threadIdx.y == 0 && c < C) {
      mean_out[c] = mean[0];
      var_out[c] = m2[0] / n;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_act_forward

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads) bn_act_forward_kernel(const BnActForwardArgs<T> a, const Sizes s) {
  using A = acc_t<T>;
  using G = Geo<L, VEC>;
  constexpr int NC = G::kChannels;
  constexpr int K = VEC / NC;
  const G g(s);
  for (int64_t tile = blockIdx.y; tile < g.num_tiles(); tile += gridDim.y) {
    const int64_t c0 = g.channel(tile);
    if (c0 < 0) continue;
    const PreAct<A, NC> pre(a, c0);
    Pack<T, VEC> xp[kForwardUnroll], rp[kForwardUnroll];
    const auto load = [&](int u, int64_t off) {
      xp[u] = load_pack<T, VEC>(a.x, off);
      if (pre.has_res) rp[u] = load_pack<T, VEC>(a.residual, off);
    };
    const auto use = [&](int u, int64_t off) {
      Pack<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A r = pre.has_res ? Num<T>::load(rp[u].v[j]) : A(0);
        A z = pre.z(Num<T>::load(xp[u].v[j]), r, j / K);
        if (a.relu) z = z < A(0) ? A(0) : z;  // keeps NaN, like torch.relu
        o.v[j] = Num<T>::store(z);
      }
      store_pack<T, VEC>(a.out, off, o);
    };
    walk<kForwardUnroll>(g.cursor(tile), load, use);
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_act_backward_reduce

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads)
    bn_act_backward_reduce_kernel(const BnActBackwardReduceArgs<T> a, const Sizes s, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  using G = Geo<L, VEC>;
  constexpr int NC = G::kChannels;
  constexpr int K = VEC / NC;
  __shared__ A smem[kThreads * 3 * NC];
  const G g(s);
  const int64_t P = gridDim.x;
  const bool has_rbn = a.res_mean != nullptr;
  const bool load_res = a.residual != nullptr && (a.relu || has_rbn);
  for (int64_t tile = blockIdx.y; tile < g.num_tiles(); tile += gridDim.y) {
    const int64_t c0 = g.channel(tile);
    const int64_t cl = c0 < 0 ? 0 : c0;  // idle threads still take part in block_sum
    const PreAct<A, NC> pre(a, cl);
    A mu[NC], rmu[NC];
    load_channels(a.mean, cl, A(0), mu);
    load_channels(a.res_mean, cl, A(0), rmu);
    A sum[3 * NC];  // [sum dz | sum dz*(x-mean) | sum dz*(r-res_mean)] x NC
#pragma unroll
    for (int k = 0; k < 3 * NC; ++k) sum[k] = A(0);
    Pack<T, VEC> gp[kBackwardReduceUnroll], xp[kBackwardReduceUnroll], rp[kBackwardReduceUnroll];
    const auto load = [&](int u, int64_t off) {
      gp[u] = load_pack<T, VEC>(a.grad_out, off);
      xp[u] = load_pack<T, VEC>(a.x, off);
      if (load_res) rp[u] = load_pack<T, VEC>(a.residual, off);
    };
    const auto use = [&](int u, int64_t) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int k = j / K;
        const A x = Num<T>::load(xp[u].v[j]);
        const A r = load_res ? Num<T>::load(rp[u].v[j]) : A(0);
        const A dz = pre.dz(Num<T>::load(gp[u].v[j]), x, r, k);
        sum[k] += dz;
        sum[NC + k] += dz * (x - mu[k]);
        if (has_rbn) sum[2 * NC + k] += dz * (r - rmu[k]);
      }
    };
    walk<kBackwardReduceUnroll>(g.cursor(tile), load, use);
    block_sum<A, 3 * NC>(sum, smem);
    if (threadIdx.y == 0 && c0 >= 0) {
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int64_t c = c0 + k;
        if (P == 1) {
          a.sum_dz[c] = sum[k];
          a.sum_dz_xhat[c] = sum[NC + k] * a.invstd[c];
          if (has_rbn) a.sum_dz_rhat[c] = sum[2 * NC + k] * a.res_invstd[c];
        } else {
          ws[(0 * P + blockIdx.x) * s.C + c] = sum[k];
          ws[(1 * P + blockIdx.x) * s.C + c] = sum[NC + k];
          if (has_rbn) ws[(2 * P + blockIdx.x) * s.C + c] = sum[2 * NC + k];
        }
      }
    }
  }
}

// Sums the P partials of each channel (ws is [2 or 3][P][C]) and scales by invstd / res_invstd.
template <typename T>
__global__ void __launch_bounds__(kFinalizeX* kFinalizeY)
    bn_act_backward_reduce_finalize_kernel(const BnActBackwardReduceArgs<T> a, const acc_t<T>* __restrict__ ws,
                                           int64_t P, int64_t C) {
  using A = acc_t<T>;
  __shared__ A smem[kFinalizeX * kFinalizeY * 3];
  const bool has_rbn = a.res_mean != nullptr;
  const int64_t blocks = (C + kFinalizeX - 1) / kFinalizeX;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t c = b * kFinalizeX + threadIdx.x;
    A v[3] = {A(0), A(0), A(0)};
    if (c < C) {
      for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
        v[0] += ws[p * C + c];
        v[1] += ws[(P + p) * C + c];
        if (has_rbn) v[2] += ws[(2 * P + p) * C + c];
      }
    }
    block_sum<A, 3>(v, smem);
    if (threadIdx.y == 0 && c < C) {
      a.sum_dz[c] = v[0];
      a.sum_dz_xhat[c] = v[1] * a.invstd[c];
      if (has_rbn) a.sum_dz_rhat[c] = v[2] * a.res_invstd[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_act_backward_elemt

template <typename T, int VEC, Layout L>
__global__ void __launch_bounds__(kThreads)
    bn_act_backward_elemt_kernel(const BnActBackwardElemtArgs<T> a, const Sizes s) {
  using A = acc_t<T>;
  using G = Geo<L, VEC>;
  constexpr int NC = G::kChannels;
  constexpr int K = VEC / NC;
  const G g(s);
  const bool has_res = a.residual != nullptr;
  const bool train = a.sum_dz != nullptr;
  const bool res_train = train && has_res && a.sum_dz_rhat != nullptr;
  const bool need_x = a.relu || train;
  const bool need_r = has_res && (a.relu || res_train);
  const bool write_gr = a.grad_residual != nullptr;
  for (int64_t tile = blockIdx.y; tile < g.num_tiles(); tile += gridDim.y) {
    const int64_t c0 = g.channel(tile);
    if (c0 < 0) continue;
    const PreAct<A, NC> pre(a, c0);
    // grad_x = sc*(dz - mdz - (x - mu)*kx) with mdz = sum_dz/count, kx = invstd*sum_dz_xhat/count; likewise
    // for the residual.
    A mu[NC], mdz[NC], kx[NC], rmu[NC], krx[NC];
    load_channels(train ? a.mean : nullptr, c0, A(0), mu);
    load_channels(a.sum_dz, c0, A(0), mdz);
    load_channels(train ? a.invstd : nullptr, c0, A(0), kx);
    load_channels(res_train ? a.res_mean : nullptr, c0, A(0), rmu);
    load_channels(res_train ? a.res_invstd : nullptr, c0, A(0), krx);
    if (train) {
      const A count = A(a.count);
      A t[NC], rt[NC];
      load_channels(a.sum_dz_xhat, c0, A(0), t);
      load_channels(res_train ? a.sum_dz_rhat : nullptr, c0, A(0), rt);
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        mdz[k] /= count;
        kx[k] *= t[k] / count;
        krx[k] *= rt[k] / count;
      }
    }
    Pack<T, VEC> gp[kBackwardElemtUnroll], xp[kBackwardElemtUnroll], rp[kBackwardElemtUnroll];
    const auto load = [&](int u, int64_t off) {
      gp[u] = load_pack<T, VEC>(a.grad_out, off);
      if (need_x) xp[u] = load_pack<T, VEC>(a.x, off);
      if (need_r) rp[u] = load_pack<T, VEC>(a.residual, off);
    };
    const auto use = [&](int u, int64_t off) {
      Pack<T, VEC> gx, gr;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int k = j / K;
        const A x = need_x ? Num<T>::load(xp[u].v[j]) : A(0);
        const A r = need_r ? Num<T>::load(rp[u].v[j]) : A(0);
        const A dz = pre.dz(Num<T>::load(gp[u].v[j]), x, r, k);
        gx.v[j] = Num<T>::store(train ? pre.sc[k] * (dz - mdz[k] - (x - mu[k]) * kx[k]) : pre.sc[k] * dz);
        gr.v[j] = Num<T>::store(res_train ? pre.rsc[k] * (dz - mdz[k] - (r - rmu[k]) * krx[k]) : pre.rsc[k] * dz);
      }
      store_pack<T, VEC>(a.grad_x, off, gx);
      if (write_gr) store_pack<T, VEC>(a.grad_residual, off, gr);
    };
    walk<kBackwardElemtUnroll>(g.cursor(tile), load, use);
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_finalize

constexpr int kFinalizeThreads = 256;
constexpr int64_t kMaxFinalizeBlocks = 1024;

template <typename A>
__device__ __forceinline__ A load_any(const AnyVector& v, int64_t i) {
  switch (v.dtype) {
    case DType::kFloat64:
      return A(static_cast<const double*>(v.data)[i]);
    case DType::kFloat16:
      return A(Num<__half>::load(static_cast<const __half*>(v.data)[i]));
    case DType::kBFloat16:
      return A(Num<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(v.data)[i]));
    default:
      return A(static_cast<const float*>(v.data)[i]);
  }
}

template <typename A>
__device__ __forceinline__ A load_any(const MutableAnyVector& v, int64_t i) {
  return load_any<A>(AnyVector{v.data, v.dtype}, i);
}

template <typename A>
__device__ __forceinline__ void store_any(const MutableAnyVector& v, int64_t i, A value) {
  switch (v.dtype) {
    case DType::kFloat64:
      static_cast<double*>(v.data)[i] = double(value);
      return;
    case DType::kFloat16:
      static_cast<__half*>(v.data)[i] = Num<__half>::store(float(value));
      return;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(v.data)[i] = Num<__nv_bfloat16>::store(float(value));
      return;
    default:
      static_cast<float*>(v.data)[i] = float(value);
  }
}

// Grid-stride over the channels. When it counts num_batches_tracked it runs as one block: every thread reads
// the old count before thread 0 stores the new one, so all channels use the same weight.
template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads) bn_finalize_kernel(const BnFinalizeArgs<A> a, int64_t C) {
  int64_t tracked = 0;
  if (a.num_batches_tracked != nullptr) {
    tracked = *a.num_batches_tracked + 1;
    __syncthreads();
    if (threadIdx.x == 0) *a.num_batches_tracked = tracked;
  }
  const bool update = a.running_mean.data != nullptr;
  const A f = a.cumulative ? A(1) / A(tracked) : A(a.momentum);
  const A bessel = A(a.count) / A(a.count > 1 ? a.count - 1 : 1);
  const A eps = A(a.eps);
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    const A mean = load_any<A>(a.mean, c);
    const A var = load_any<A>(a.var, c);
    const A invstd = A(1) / sqrt(var + eps);
    const A scale = a.weight.data != nullptr ? load_any<A>(a.weight, c) * invstd : invstd;
    const A bias = a.bias.data != nullptr ? load_any<A>(a.bias, c) : A(0);
    a.invstd[c] = invstd;
    a.scale[c] = scale;
    a.shift[c] = bias - mean * scale;
    if (update) {
      const A running_mean = load_any<A>(a.running_mean, c);
      const A running_var = load_any<A>(a.running_var, c);
      store_any<A>(a.running_mean, c, running_mean + f * (mean - running_mean));
      store_any<A>(a.running_var, c, running_var + f * (var * bessel - running_var));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch planning

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  dim3 grid, block;
};

// Blocks of `kernel` (with `threads` threads) the current device holds at once: SMs x occupancy, cached.
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, int threads, int64_t* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int>, int64_t> cache;
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), threads);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  *out = int64_t(std::max(sms, 1)) * std::max(per_sm, 1);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = *out;
  return cudaSuccess;
}

// Block and grid of a main kernel. Reductions (kind kReduce): at most one wave of resident blocks, since each
// block adds a partial per channel, spread over the tiles first, and no more blocks along a tile than leave each
// thread kReduceMinIters positions. Elementwise kernels: about kElemPositionsPerThread positions per thread, so
// many short blocks that the hardware balances over the SMs (a wave-sized grid-stride grid would leave idle SMs
// whenever its block count is not a multiple of what is resident).
enum class Kind { kElementwise, kReduce };
constexpr int64_t kReduceMinIters = 8;
constexpr int64_t kElemPositionsPerThread = 4;

template <typename Kernel>
cudaError_t make_plan(Kernel kernel, Kind kind, Layout layout, const Sizes& s, int vec, Plan* plan) {
  int64_t tiles, positions;
  if (layout == Layout::kNCHW) {
    plan->block = dim3(1, kThreads);
    tiles = s.C;
    positions = s.N * (s.HW / vec);
  } else {
    const int64_t cv = s.C / vec;
    const int bx = cv < kWarp ? int(cv) : kWarp;
    plan->block = dim3(bx, kThreads / bx);
    tiles = ceil_div(cv, bx);
    positions = s.N * s.HW;
  }
  const int64_t gy = std::min(tiles, kMaxGridY);
  const int64_t by = plan->block.y;
  int64_t gx;
  if (kind == Kind::kReduce) {
    int64_t target = 0;
    const cudaError_t err = resident_blocks(kernel, int(plan->block.x * plan->block.y), &target);
    if (err != cudaSuccess) return err;
    const int64_t useful = std::max<int64_t>(1, ceil_div(positions, by * kReduceMinIters));
    gx = std::min(std::max<int64_t>(1, target / gy), useful);
  } else {
    gx = std::max<int64_t>(1, ceil_div(positions, by * kElemPositionsPerThread));
  }
  plan->grid = dim3(unsigned(std::min<int64_t>(gx, INT_MAX)), unsigned(gy));
  return cudaSuccess;
}

dim3 finalize_grid(int64_t C) { return dim3(unsigned(std::min<int64_t>(ceil_div(C, kFinalizeX), kMaxGridY))); }
constexpr dim3 kFinalizeBlock(kFinalizeX, kFinalizeY);  // of the finalize kernels

// Widest vectors, in elements: 16 bytes. The NHWC backward kernels keep 9 (elemt) or 6 (reduce) per-channel
// parameters for each of their VEC channels in registers; at 8 channels they would exceed 128 registers and
// halve the resident blocks, so they stop at 4 channels (8-byte accesses for 2-byte types).
template <typename T>
constexpr int kMaxVec = int(16 / sizeof(T));
template <typename T>
constexpr int kMaxVecNhwcBackward = kMaxVec<T> < 4 ? kMaxVec<T> : 4;

// Widest vector (at most max_vec elements) dividing the inner extent with every pointer aligned to it.
template <typename T>
int pick_vec(Layout layout, const Sizes& s, int max_vec, std::initializer_list<const void*> ptrs) {
  const int64_t inner = layout == Layout::kNCHW ? s.HW : s.C;
  for (int v = max_vec; v > 1; v /= 2) {
    if (inner % v != 0) continue;
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && reinterpret_cast<uintptr_t>(p) % (v * sizeof(T)) == 0;
    if (aligned) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>{}, std::integral_constant<Layout, L>{}) for the run-time vec and
// layout; only VEC <= kMaxNchw (NCHW) or kMaxNhwc (NHWC) are instantiated.
template <int kMaxNchw, int kMaxNhwc, typename F>
cudaError_t dispatch(Layout layout, int vec, F&& f) {
  auto with_vec = [&](auto l) -> cudaError_t {
    constexpr int kMax = decltype(l)::value == Layout::kNCHW ? kMaxNchw : kMaxNhwc;
    switch (vec) {
      case 8:
        if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{}, l);
        break;
      case 4:
        if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{}, l);
        break;
      case 2:
        if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{}, l);
        break;
      case 1:
        return f(std::integral_constant<int, 1>{}, l);
      default:
        break;
    }
    return cudaErrorInvalidValue;
  };
  if (layout == Layout::kNHWC) return with_vec(std::integral_constant<Layout, Layout::kNHWC>{});
  return with_vec(std::integral_constant<Layout, Layout::kNCHW>{});
}


bool is_empty(int64_t N, int64_t C, int64_t HW) { return N * HW == 0 || C == 0; }

// The reductions plan and launch in one function so that the workspace size a caller asks for
// (need != nullptr: nothing is launched) is the one the launch uses.
//
// What the two share, for one instantiated main kernel: plan it, size the workspace (`quantities` per-channel
// partials of each of the P = grid.x blocks, laid out [quantities][P][C], when P > 1; none otherwise), then
// either report that size or check the caller's workspace, launch the kernel and, when P > 1, call
// finalize(w, P) to launch the kernel that combines the partials in w.
template <typename A, typename Kernel, typename Args, typename Finalize>
cudaError_t launch_reduction(Kernel kernel, const Args& a, Layout layout, const Sizes& s, int vec,
                             int64_t quantities, void* ws, size_t ws_bytes, size_t* need, cudaStream_t stream,
                             const Finalize& finalize) {
  Plan plan;
  cudaError_t err = make_plan(kernel, Kind::kReduce, layout, s, vec, &plan);
  if (err != cudaSuccess) return err;
  const int64_t P = plan.grid.x;
  const size_t bytes = P > 1 ? size_t(quantities * P * s.C) * sizeof(A) : 0;
  if (need != nullptr) {
    *need = bytes;
    return cudaSuccess;
  }
  if (ws_bytes < bytes || (bytes > 0 && ws == nullptr)) return cudaErrorInvalidValue;
  A* w = P > 1 ? static_cast<A*>(ws) : nullptr;
  kernel<<<plan.grid, plan.block, 0, stream>>>(a, s, w);
  err = cudaGetLastError();
  if (err != cudaSuccess || P == 1) return err;
  finalize(static_cast<const A*>(w), P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_stats(const BnStatsArgs<T>& a, const Sizes& s, Layout layout, void* ws, size_t ws_bytes,
                      size_t* need, cudaStream_t stream) {
  using A = acc_t<T>;
  if (need != nullptr) *need = 0;
  if (is_empty(s.N, s.C, s.HW)) return cudaSuccess;
  const int vec = pick_vec<T>(layout, s, kMaxVec<T>, {a.x});
  return dispatch<kMaxVec<T>, kMaxVec<T>>(layout, vec, [&](auto v, auto l) -> cudaError_t {
    constexpr int VEC = decltype(v)::value;
    constexpr Layout LAYOUT = decltype(l)::value;
    const auto finalize = [&](const A* w, int64_t P) {
      bn_stats_finalize_kernel<A><<<finalize_grid(s.C), kFinalizeBlock, 0, stream>>>(w, P, s.C, a.mean, a.var);
    };
    return launch_reduction<A>(bn_stats_kernel<T, VEC, LAYOUT>, a, LAYOUT, s, VEC, 3, ws, ws_bytes, need, stream,
                               finalize);
  });
}

template <typename T>
cudaError_t run_backward_reduce(const BnActBackwardReduceArgs<T>& a, const Sizes& s, Layout layout, void* ws,
                                size_t ws_bytes, size_t* need, cudaStream_t stream) {
  using A = acc_t<T>;
  if (need != nullptr) *need = 0;
  if (is_empty(s.N, s.C, s.HW)) return cudaSuccess;
  const int max_vec = layout == Layout::kNHWC ? kMaxVecNhwcBackward<T> : kMaxVec<T>;
  const int vec = pick_vec<T>(layout, s, max_vec, {a.grad_out, a.x, a.residual});
  return dispatch<kMaxVec<T>, kMaxVecNhwcBackward<T>>(layout, vec, [&](auto v, auto l) -> cudaError_t {
    constexpr int VEC = decltype(v)::value;
    constexpr Layout LAYOUT = decltype(l)::value;
    const int64_t quantities = a.res_mean != nullptr ? 3 : 2;
    const auto finalize = [&](const A* w, int64_t P) {
      bn_act_backward_reduce_finalize_kernel<T><<<finalize_grid(s.C), kFinalizeBlock, 0, stream>>>(a, w, P, s.C);
    };
    return launch_reduction<A>(bn_act_backward_reduce_kernel<T, VEC, LAYOUT>, a, LAYOUT, s, VEC, quantities, ws,
                               ws_bytes, need, stream, finalize);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t bn_stats_workspace_bytes(const BnStatsArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                     Layout layout, size_t* bytes) {
  return run_stats<T>(args, Sizes{N, C, HW}, layout, nullptr, 0, bytes, nullptr);
}

template <typename T>
cudaError_t bn_stats(const BnStatsArgs<T>& args, int64_t N, int64_t C, int64_t HW, Layout layout,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return run_stats<T>(args, Sizes{N, C, HW}, layout, workspace, workspace_bytes, nullptr, stream);
}

template <typename T>
cudaError_t bn_act_forward(const BnActForwardArgs<T>& args, int64_t N, int64_t C, int64_t HW, Layout layout,
                           cudaStream_t stream) {
  const Sizes s{N, C, HW};
  if (is_empty(N, C, HW)) return cudaSuccess;
  const int vec = pick_vec<T>(layout, s, kMaxVec<T>, {args.x, args.residual, args.out});
  return dispatch<kMaxVec<T>, kMaxVec<T>>(layout, vec, [&](auto v, auto l) -> cudaError_t {
    constexpr int VEC = decltype(v)::value;
    constexpr Layout LAYOUT = decltype(l)::value;
    const auto kernel = bn_act_forward_kernel<T, VEC, LAYOUT>;
    Plan plan;
    const cudaError_t err = make_plan(kernel, Kind::kElementwise, LAYOUT, s, VEC, &plan);
    if (err != cudaSuccess) return err;
    kernel<<<plan.grid, plan.block, 0, stream>>>(args, s);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t bn_act_backward_reduce_workspace_bytes(const BnActBackwardReduceArgs<T>& args, int64_t N,
                                                   int64_t C, int64_t HW, Layout layout, size_t* bytes) {
  return run_backward_reduce<T>(args, Sizes{N, C, HW}, layout, nullptr, 0, bytes, nullptr);
}

template <typename T>
cudaError_t bn_act_backward_reduce(const BnActBackwardReduceArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                   Layout layout, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream) {
  return run_backward_reduce<T>(args, Sizes{N, C, HW}, layout, workspace, workspace_bytes, nullptr, stream);
}

template <typename T>
cudaError_t bn_act_backward_elemt(const BnActBackwardElemtArgs<T>& args, int64_t N, int64_t C, int64_t HW,
                                  Layout layout, cudaStream_t stream) {
  const Sizes s{N, C, HW};
  if (is_empty(N, C, HW)) return cudaSuccess;
  const int max_vec = layout == Layout::kNHWC ? kMaxVecNhwcBackward<T> : kMaxVec<T>;
  const int vec =
      pick_vec<T>(layout, s, max_vec, {args.grad_out, args.x, args.residual, args.grad_x, args.grad_residual});
  return dispatch<kMaxVec<T>, kMaxVecNhwcBackward<T>>(layout, vec, [&](auto v, auto l) -> cudaError_t {
    constexpr int VEC = decltype(v)::value;
    constexpr Layout LAYOUT = decltype(l)::value;
    const auto kernel = bn_act_backward_elemt_kernel<T, VEC, LAYOUT>;
    Plan plan;
    const cudaError_t err = make_plan(kernel, Kind::kElementwise, LAYOUT, s, VEC, &plan);
    if (err != cudaSuccess) return err;
    kernel<<<plan.grid, plan.block, 0, stream>>>(args, s);
    return cudaGetLastError();
  });
}

template <typename A>
cudaError_t bn_finalize(const BnFinalizeArgs<A>& args, int64_t C, cudaStream_t stream) {
  const bool counts = args.num_batches_tracked != nullptr;
  if (C == 0 && !counts) return cudaSuccess;
  const int64_t blocks = counts ? 1 : std::min(ceil_div(C, kFinalizeThreads), kMaxFinalizeBlocks);
  bn_finalize_kernel<A><<<dim3(unsigned(blocks)), dim3(kFinalizeThreads), 0, stream>>>(args, C);
  return cudaGetLastError();
}

template cudaError_t bn_finalize<float>(const BnFinalizeArgs<float>&, int64_t, cudaStream_t);
template cudaError_t bn_finalize<double>(const BnFinalizeArgs<double>&, int64_t, cudaStream_t);

#define PYFAST_INSTANTIATE(T)                                                                                 \
  template cudaError_t bn_stats_workspace_bytes<T>(const BnStatsArgs<T>&, int64_t, int64_t, int64_t, Layout, \
                                                   size_t*);                                                 \
  template cudaError_t bn_stats<T>(const BnStatsArgs<T>&, int64_t, int64_t, int64_t, Layout, void*, size_t,  \
                                   cudaStream_t);                                                            \
  template cudaError_t bn_act_forward<T>(const BnActForwardArgs<T>&, int64_t, int64_t, int64_t, Layout,      \
                                         cudaStream_t);                                                      \
  template cudaError_t bn_act_backward_reduce_workspace_bytes<T>(const BnActBackwardReduceArgs<T>&, int64_t, \
                                                                 int64_t, int64_t, Layout, size_t*);         \
  template cudaError_t bn_act_backward_reduce<T>(const BnActBackwardReduceArgs<T>&, int64_t, int64_t,        \
                                                 int64_t, Layout, void*, size_t, cudaStream_t);              \
  template cudaError_t bn_act_backward_elemt<T>(const BnActBackwardElemtArgs<T>&, int64_t, int64_t, int64_t, \
                                                Layout, cudaStream_t);

PYFAST_INSTANTIATE(float)
PYFAST_INSTANTIATE(double)
PYFAST_INSTANTIATE(__half)
PYFAST_INSTANTIATE(__nv_bfloat16)

#undef PYFAST_INSTANTIATE

}  // namespace cuda
}  // namespace pyfast
