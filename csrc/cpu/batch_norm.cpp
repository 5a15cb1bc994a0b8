// CPU kernels of the five BN primitives; their semantics are docs/ARCHITECTURE.md, section 1.
//
// Memory is walked as [outer][C][inner] (Layout): NCHW as planes holding one channel each,
// channels_last as rows holding every channel. Both walks give the per-vector math of an op a
// `param(v)` accessor that yields the per-channel vector v[c] in the vector's lanes: a broadcast
// scalar inside a plane, a vector load across a row. So each op's math is written once.
// Reductions fold vectors into per-lane accumulators in the accumulation type, then combine lanes and
// blocks in double in a fixed order: results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ceil_div.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../batch_norm_args.h"

namespace pyfast {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using at::vec::VectorizedN;

constexpr int64_t kGrain = 32768;  // elements per parallel task, ATen's own grain size
constexpr int64_t kRowBlock = 65536;  // elements per block of rows in a channels_last reduction

// ---------------------------------------------------------------------------------------------
// Memory walk

// The input's memory as [outer][channels][inner]. NCHW-contiguous is (N, C, H*W): planes of one
// channel. channels_last, and any input with H*W == 1, is (N*H*W, C, 1): rows of all channels.
struct Layout {
  int64_t outer, channels, inner;
  bool planes() const { return inner > 1; }
};

Layout layout_of(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t inner = c10::multiply_integers(x.sizes().slice(2));
  // A C == 1 tensor is both contiguous and channels-innermost: planes use the vector lanes better.
  const bool rows = inner == 1 || (channels_innermost(x) && !x.is_contiguous());
  return rows ? Layout{n * inner, c, 1} : Layout{n, c, inner};
}


// One vector of scalar_t lanes, computed on in the accumulation type: 8 floats or 4 doubles, or 16
// bf16/fp16 values widened into two float vectors (widths for AVX2).
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kParts = Vectorized<scalar_t>::size() / Vectorized<acc_t>::size();
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();
  using Vec = VectorizedN<acc_t, kParts>;

  C10_ALWAYS_INLINE static Vec load(const scalar_t* p, int64_t n) {
    const auto v = Vectorized<scalar_t>::loadu(p, static_cast<int>(n));
    return at::vec::convert<acc_t, kParts, scalar_t, 1>(VectorizedN<scalar_t, 1>(v));
  }
  C10_ALWAYS_INLINE static void store(scalar_t* p, const Vec& v, int64_t n) {
    at::vec::convert<scalar_t, 1, acc_t, kParts>(v).store(p, static_cast<int>(n));
  }
  // Per-channel values p[0, n) of the accumulation type (VectorizedN::loadu is not always inlined).
  C10_ALWAYS_INLINE static Vec load_acc(const acc_t* p, int64_t n) {
    constexpr int64_t kPart = Vectorized<acc_t>::size();
    Vec v;
    for (int i = 0; i < kParts; ++i) {
      v[i] = Vectorized<acc_t>::loadu(p + i * kPart, std::clamp<int64_t>(n - i * kPart, 0, kPart));
    }
    return v;
  }
};

// Calls fn(offset, n, param) for each vector of plane p of a planes layout. The plane holds one
// channel c, so param(v) broadcasts v[c].
template <typename scalar_t, typename Fn>
void visit_plane(const Layout& lay, int64_t p, const Fn& fn) {
  using L = Lanes<scalar_t>;
  const int64_t c = p % lay.channels;
  const auto param = [c](const typename L::acc_t* v) { return typename L::Vec(v[c]); };
  for (int64_t i = 0; i < lay.inner; i += L::kSize) {
    fn(p * lay.inner + i, std::min(L::kSize, lay.inner - i), param);
  }
}

// Calls fn(offset, n, param) for each vector of row r of a rows layout. Lane j holds channel c + j,
// so param(v) loads v[c, c + n).
template <typename scalar_t, typename Fn>
void visit_row(const Layout& lay, int64_t r, const Fn& fn) {
  using L = Lanes<scalar_t>;
  for (int64_t c = 0; c < lay.channels; c += L::kSize) {
    const int64_t n = std::min(L::kSize, lay.channels - c);
    fn(r * lay.channels + c, n, [c, n](const typename L::acc_t* v) { return L::load_acc(v + c, n); });
  }
}

// Runs fn(offset, n, param) on every vector of the layout, in parallel.
template <typename scalar_t, typename Fn>
void for_each_vector(const Layout& lay, const Fn& fn) {
  const int64_t units = lay.planes() ? lay.outer * lay.channels : lay.outer;
  const int64_t unit_size = lay.planes() ? lay.inner : lay.channels;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrain / std::max<int64_t>(unit_size, 1)), [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      if (lay.planes()) {
        visit_plane<scalar_t>(lay, u, fn);
      } else {
        visit_row<scalar_t>(lay, u, fn);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Per-channel reductions

// K per-lane accumulators (Welford's mean and M2, or sums).
template <typename scalar_t, int K>
using State = std::array<typename Lanes<scalar_t>::Vec, K>;

// A reduction result over n elements of one channel.
template <int K>
struct Partial {
  double n = 0;
  std::array<double, K> v{};
};

// Independent accumulators that a plane's vectors take in turn: each update waits on the previous
// one of its accumulator, so a single one would be bound by that latency instead of by memory.
constexpr int kChains = 4;

template <typename scalar_t, int K>
State<scalar_t, K> zero_state() {
  State<scalar_t, K> s;
  s.fill(typename Lanes<scalar_t>::Vec(0));
  return s;
}

// Lane j of s as a Partial over n elements, at out[j].
template <typename scalar_t, int K>
void store_lanes(const State<scalar_t, K>& s, Partial<K>* out, int64_t lanes, const int64_t* n) {
  using L = Lanes<scalar_t>;
  std::array<std::array<typename L::acc_t, L::kSize>, K> values;
  for (int k = 0; k < K; ++k) s[k].store(values[k].data());
  for (int64_t j = 0; j < lanes; ++j) {
    out[j].n = static_cast<double>(n[j]);
    for (int k = 0; k < K; ++k) out[j].v[k] = values[k][j];
  }
}

// Folds plane p into one Partial: its vectors into the lanes of kChains States, then the lanes.
// A long plane goes by groups of kChains vectors, vector u of a group to chain u. The rest, and a
// short plane whole (too short to repay combining kChains x kSize lanes), go to chain 0; the last
// vector may be partial and updates its first n lanes only.
template <typename scalar_t, int K, typename Step, typename Combine>
Partial<K> reduce_plane(const Layout& lay, int64_t p, const Step& step, const Combine& combine) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  constexpr int64_t kLanes = kChains * L::kSize;
  const int64_t c = p % lay.channels, len = lay.inner, base = p * len;
  const int64_t groups = len >= 2 * kLanes ? len / kLanes : 0;
  const auto param = [c](const acc_t* v) { return typename L::Vec(v[c]); };
  std::array<State<scalar_t, K>, kChains> s;
  s.fill(zero_state<scalar_t, K>());
  for (int64_t g = 0; g < groups; ++g) {
    const acc_t inv_n = acc_t(1) / acc_t(g + 1);
    for (int u = 0; u < kChains; ++u) s[u] = step(s[u], inv_n, base + (g * kChains + u) * L::kSize, L::kSize, param);
  }
  std::array<int64_t, kLanes> counts;  // per lane, chain-major
  counts.fill(groups);
  for (int64_t i = groups * kLanes; i < len; i += L::kSize) {
    const int64_t n = std::min(L::kSize, len - i);
    const auto next = step(s[0], acc_t(1) / acc_t(counts[0] + 1), base + i, n, param);
    for (int k = 0; k < K; ++k) s[0][k] = L::Vec::set(s[0][k], next[k], n);
    for (int64_t j = 0; j < n; ++j) ++counts[j];
  }
  const int chains = groups > 0 ? kChains : 1;
  std::array<Partial<K>, kLanes> lanes;
  for (int u = 0; u < chains; ++u) {
    store_lanes<scalar_t, K>(s[u], &lanes[u * L::kSize], L::kSize, &counts[u * L::kSize]);
  }
  return combine(lanes.data(), chains * L::kSize, 1);
}

// Folds rows [r0, r1) of a rows layout into out[0, C): per-thread channel accumulators, lane j of
// states[i] being channel i * kSize + j. Consecutive vectors of a row update different states,
// so no chains are needed here.
template <typename scalar_t, int K, typename Step>
void reduce_rows(const Layout& lay, int64_t r0, int64_t r1, const Step& step, Partial<K>* out) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  std::vector<State<scalar_t, K>> states(at::ceil_div(lay.channels, L::kSize), zero_state<scalar_t, K>());
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t inv_n = acc_t(1) / acc_t(r - r0 + 1);
    auto* s = states.data();
    visit_row<scalar_t>(lay, r, [&](int64_t offset, int64_t n, const auto& param) {
      *s = step(*s, inv_n, offset, n, param);
      ++s;
    });
  }
  std::array<int64_t, L::kSize> counts;
  counts.fill(r1 - r0);
  for (size_t i = 0; i < states.size(); ++i) {
    const int64_t c0 = static_cast<int64_t>(i) * L::kSize;
    store_lanes<scalar_t, K>(states[i], out + c0, std::min(L::kSize, lay.channels - c0), counts.data());
  }
}

// One Partial per channel. step(state, inv_n, offset, n, param) folds one vector into per-lane
// accumulators (inv_n = 1 / the lanes' count after this step, for Welford); combine(parts, count,
// stride) folds Partials into one. Blocks (planes, or blocks of rows) are reduced in parallel into
// a [block][channel] table whose columns are then combined, in a fixed order.
template <typename scalar_t, int K, typename Step, typename Combine>
std::vector<Partial<K>> reduce_channels(const Layout& lay, const Step& step, const Combine& combine) {
  const int64_t C = lay.channels;
  std::vector<Partial<K>> blocks;
  if (lay.planes()) {
    blocks.resize(lay.outer * C);
    at::parallel_for(0, lay.outer * C, std::max<int64_t>(1, kGrain / lay.inner), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) blocks[p] = reduce_plane<scalar_t, K>(lay, p, step, combine);
    });
  } else {
    const int64_t rows_per_block = at::ceil_div(kRowBlock, std::max<int64_t>(C, 1));
    blocks.resize(at::ceil_div(lay.outer, rows_per_block) * C);
    at::parallel_for(0, at::ceil_div(lay.outer, rows_per_block), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * rows_per_block, r1 = std::min(r0 + rows_per_block, lay.outer);
        reduce_rows<scalar_t, K>(lay, r0, r1, step, &blocks[k * C]);
      }
    });
  }
  std::vector<Partial<K>> result(C);
  const int64_t n_blocks = C > 0 ? static_cast<int64_t>(blocks.size()) / C : 0;
  at::parallel_for(0, C, std::max<int64_t>(1, kGrain / 8 / std::max<int64_t>(n_blocks, 1)), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) result[c] = combine(&blocks[c], n_blocks, C);
  });
  return result;
}

// Chan et al.'s combination of (count, mean, M2) partials, in its k-way form:
//   n = sum n_i,  mean = sum n_i mean_i / n,  M2 = sum M2_i + sum n_i (mean_i - mean)^2.
// No parts, or parts of no elements, give NaN mean and variance.
Partial<2> chan_combine(const Partial<2>* parts, int64_t count, int64_t stride) {
  Partial<2> total;
  for (int64_t i = 0; i < count; ++i) {
    total.n += parts[i * stride].n;
    total.v[0] += parts[i * stride].n * parts[i * stride].v[0];
  }
  total.v[0] /= total.n;
  for (int64_t i = 0; i < count; ++i) {
    const Partial<2>& p = parts[i * stride];
    const double delta = p.v[0] - total.v[0];
    total.v[1] += p.v[1] + p.n * delta * delta;
  }
  return total;
}

Partial<3> sum_combine(const Partial<3>* parts, int64_t count, int64_t stride) {
  Partial<3> total;
  for (int64_t i = 0; i < count; ++i) {
    total.n += parts[i * stride].n;
    for (int k = 0; k < 3; ++k) total.v[k] += parts[i * stride].v[k];
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Arguments

// A None per-channel vector as its neutral value (ones for a scale, zeros for a shift): the kernels read
// scale/shift pointers unconditionally. From a buffer kept per thread and per value, not a fresh tensor: an
// allocation and a fill per call, for each None, is host time that matters on small inputs (add_relu has four).
template <typename acc_t>
const acc_t* data_or_neutral(const Tensor& t, int64_t channels, int value) {
  if (t.defined()) return t.const_data_ptr<acc_t>();
  thread_local std::vector<acc_t> buffers[2];
  auto& buffer = buffers[value];
  if (static_cast<int64_t>(buffer.size()) < channels) buffer.assign(channels, static_cast<acc_t>(value));
  return buffer.data();
}

// The pre-activation z = x*scale + shift [+ residual*res_scale + res_shift] as raw pointers;
// scale/shift/res_scale/res_shift are never null (None reads as ones/zeros).
template <typename scalar_t>
struct PreAct {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  using acc_t = typename L::acc_t;
  const scalar_t* x;
  const scalar_t* residual;  // null when None
  const acc_t *scale, *shift, *res_scale, *res_shift;
  bool relu;

  C10_ALWAYS_INLINE Vec load_x(int64_t offset, int64_t n) const { return L::load(x + offset, n); }
  C10_ALWAYS_INLINE Vec load_residual(int64_t offset, int64_t n) const {
    return residual ? L::load(residual + offset, n) : Vec(0);
  }

  template <typename Param>
  C10_ALWAYS_INLINE Vec z(const Vec& xv, const Vec& rv, const Param& param) const {
    const Vec z = at::vec::fmadd(xv, param(scale), param(shift));
    return residual ? z + at::vec::fmadd(rv, param(res_scale), param(res_shift)) : z;
  }
  // Under the ReLU, grad_out except where z <= 0: a NaN z lets the gradient through, as torch.relu's
  // backward (threshold_backward) does.
  template <typename Param>
  C10_ALWAYS_INLINE Vec dz(const Vec& g, const Vec& xv, const Vec& rv, const Param& param) const {
    return relu ? Vec::blendv(g, Vec(0), z(xv, rv, param) <= Vec(0)) : g;
  }
};

// The tensors that define z, in x's layout; a None scale/shift is an undefined tensor.
struct PreActInputs {
  Tensor x, residual, scale, shift, res_scale, res_shift;

  explicit PreActInputs(const PreActTensors& t)
      : x(t.x), residual(t.residual), scale(t.scale), shift(t.shift), res_scale(t.res_scale), res_shift(t.res_shift) {}

  template <typename scalar_t>
  PreAct<scalar_t> pointers(bool relu) const {
    using acc_t = typename Lanes<scalar_t>::acc_t;
    const int64_t channels = x.size(1);
    return {x.const_data_ptr<scalar_t>(),
            ptr_or_null<scalar_t>(residual),
            data_or_neutral<acc_t>(scale, channels, 1),
            data_or_neutral<acc_t>(shift, channels, 0),
            data_or_neutral<acc_t>(res_scale, channels, 1),
            data_or_neutral<acc_t>(res_shift, channels, 0),
            relu};
  }
};

// The gradient through one BN input v (x or the residual), mean_dz = sum_dz / count etc.:
//   scale * (dz - mean_dz - (v - mean) * invstd * mean_dz_vhat)   with batch statistics,
//   scale * dz                                                     without (mean_dz_vhat null).
template <typename acc_t>
struct BnGrad {
  const acc_t *scale, *mean, *invstd, *mean_dz, *mean_dz_vhat;

  template <typename Vec, typename Param>
  C10_ALWAYS_INLINE Vec operator()(Vec dz, const Vec& v, const Param& param) const {
    if (mean_dz_vhat) dz = dz - param(mean_dz) - (v - param(mean)) * param(invstd) * param(mean_dz_vhat);
    return dz * param(scale);
  }
};

// ---------------------------------------------------------------------------------------------
// The primitives

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x_in) {
  check_input("pyfast.bn_stats", x_in);
  const Layout lay = layout_of(x_in);
  const Tensor x = in_memory_order(x_in, !lay.planes());
  // Welford runs on x - shift[c]: in float, the running mean of uncentred data is rounded at the
  // scale of the mean (1e-3 for a mean of 1e4), which would show in a variance of 1.
  Tensor mean = at::empty({lay.channels}, x.options().dtype(acc_type(x)));
  Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_stats", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    // One element of each channel, x[0, c, 0, ...], as a finite shift (0 where it is not), read in place:
    // slicing it out with tensor ops would cost more host time than the whole reduction of a small input.
    std::vector<acc_t> shift(lay.channels, acc_t(0));
    if (x.numel() > 0) {
      for (int64_t c = 0; c < lay.channels; ++c) {
        const auto value = static_cast<acc_t>(data[c * x.stride(1)]);
        shift[c] = std::isfinite(value) ? value : acc_t(0);
      }
    }
    const acc_t* sh = shift.data();
    const auto welford = [&](const State<scalar_t, 2>& s, acc_t inv_n, int64_t offset, int64_t n, const auto& param) {
      const auto v = L::load(data + offset, n) - param(sh);
      const auto delta = v - s[0];
      const auto m = at::vec::fmadd(delta, typename L::Vec(inv_n), s[0]);
      return State<scalar_t, 2>{m, at::vec::fmadd(delta, v - m, s[1])};
    };
    const auto stats = reduce_channels<scalar_t, 2>(lay, welford, chan_combine);
    auto* m = mean.mutable_data_ptr<acc_t>();
    auto* v = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < lay.channels; ++c) {
      m[c] = sh[c] + stats[c].v[0];  // NaN for no elements, as torch.var_mean
      v[c] = stats[c].v[1] / stats[c].n;
    }
  });
  return {mean, var};
}

// Writes act(z) into out: a fresh tensor, or x itself for the in-place variant (a pure map: each element
// is read before it is written, by the same lane).
void act_forward_into(const PreActInputs& in, const Layout& lay, bool relu, const Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "bn_act_forward", [&] {
    using L = Lanes<scalar_t>;
    const auto pre = in.pointers<scalar_t>(relu);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_vector<scalar_t>(lay, [&](int64_t offset, int64_t n, const auto& param) {
      const auto z = pre.z(pre.load_x(offset, n), pre.load_residual(offset, n), param);
      // maximum() propagates NaN, as torch.relu does
      L::store(o + offset, relu ? at::vec::maximum(z, typename L::Vec(0)) : z, n);
    });
  });
}

Tensor bn_act_forward(const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                      const OptTensor& res_scale, const OptTensor& res_shift, bool relu) {
  constexpr const char* op = "pyfast.bn_act_forward";
  check_input(op, x);
  const Layout lay = layout_of(x);
  const PreActInputs in(pre_act_tensors(op, x, !lay.planes(), scale, shift, residual, res_scale, res_shift));
  Tensor out = at::empty_like(in.x);
  act_forward_into(in, lay, relu, out);
  return out;
}

Tensor& bn_act_forward_(Tensor& x, const OptTensor& scale, const OptTensor& shift, bool relu) {
  constexpr const char* op = "pyfast.bn_act_forward_";
  check_input(op, x);
  const Layout lay = layout_of(x);
  const PreActInputs in(pre_act_tensors(op, x, !lay.planes(), scale, shift, {}, {}, {}));
  TORCH_CHECK(in.x.is_same(x), op, ": x must be NCHW-contiguous or channels_last to be updated in place");
  act_forward_into(in, lay, relu, x);
  bump_version(x);
  return x;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_backward_reduce(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const Tensor& mean,
    const Tensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu) {
  constexpr const char* op = "pyfast.bn_act_backward_reduce";
  check_input(op, x);
  const Layout lay = layout_of(x);
  const PreActTensors checked = pre_act_tensors(op, x, !lay.planes(), scale, shift, residual, res_scale, res_shift);
  const Tensor g = like_x(op, "grad_out", grad_out, checked.x, !lay.planes());
  const NormStats stats = reduce_stats(op, checked, mean, invstd, res_mean, res_invstd);
  const PreActInputs in(checked);
  const auto acc = x.options().dtype(acc_type(x));
  Tensor sum_dz = at::empty({lay.channels}, acc), sum_dz_xhat = at::empty({lay.channels}, acc);
  Tensor sum_dz_rhat = at::empty({stats.res_mean.defined() ? lay.channels : 0}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_reduce", [&] {
    using acc_t = typename Lanes<scalar_t>::acc_t;
    const auto pre = in.pointers<scalar_t>(relu);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* mp = stats.mean.const_data_ptr<acc_t>();
    const acc_t* rmp = ptr_or_null<acc_t>(stats.res_mean);
    // Sums dz, dz*(x - mean) and dz*(r - res_mean); invstd is applied once per channel below.
    const auto sums = [&](const State<scalar_t, 3>& s, acc_t, int64_t offset, int64_t n, const auto& param) {
      const auto xv = pre.load_x(offset, n), rv = pre.load_residual(offset, n);
      const auto dz = pre.dz(Lanes<scalar_t>::load(gp + offset, n), xv, rv, param);
      return State<scalar_t, 3>{s[0] + dz, at::vec::fmadd(dz, xv - param(mp), s[1]),
                                rmp ? at::vec::fmadd(dz, rv - param(rmp), s[2]) : s[2]};
    };
    const auto total = reduce_channels<scalar_t, 3>(lay, sums, sum_combine);
    const acc_t* istd = stats.invstd.const_data_ptr<acc_t>();
    const acc_t* ristd = ptr_or_null<acc_t>(stats.res_invstd);
    auto *s0 = sum_dz.mutable_data_ptr<acc_t>(), *s1 = sum_dz_xhat.mutable_data_ptr<acc_t>();
    auto* s2 = sum_dz_rhat.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < lay.channels; ++c) {
      s0[c] = total[c].v[0];
      s1[c] = total[c].v[1] * istd[c];
      if (rmp) s2[c] = total[c].v[2] * ristd[c];
    }
  });
  return {sum_dz, sum_dz_xhat, sum_dz_rhat};
}

// sums[c] / count as a host vector of the accumulation type; empty for an undefined tensor.
template <typename acc_t>
std::vector<acc_t> per_element(const Tensor& sums, int64_t count) {
  std::vector<acc_t> out(sums.defined() ? sums.numel() : 0);
  const acc_t* s = ptr_or_null<acc_t>(sums);
  for (size_t c = 0; c < out.size(); ++c) out[c] = s[c] / static_cast<acc_t>(count);
  return out;
}

template <typename T>
const T* data_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

std::tuple<Tensor, Tensor> bn_act_backward_elemt(
    const Tensor& grad_out, const Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& mean,
    const OptTensor& invstd, const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
    const OptTensor& res_mean, const OptTensor& res_invstd, bool relu, const OptTensor& sum_dz,
    const OptTensor& sum_dz_xhat, const OptTensor& sum_dz_rhat, int64_t count) {
  constexpr const char* op = "pyfast.bn_act_backward_elemt";
  check_input(op, x);
  const Layout lay = layout_of(x);
  const PreActTensors checked = pre_act_tensors(op, x, !lay.planes(), scale, shift, residual, res_scale, res_shift);
  const Tensor g = like_x(op, "grad_out", grad_out, checked.x, !lay.planes());
  const ElemtStats stats =
      elemt_stats(op, checked, mean, invstd, res_mean, res_invstd, sum_dz, sum_dz_xhat, sum_dz_rhat, count);
  const PreActInputs in(checked);
  Tensor grad_x = at::empty_like(in.x);
  Tensor grad_residual = in.residual.defined() ? at::empty_like(in.x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {grad_x, grad_residual};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_elemt", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    const auto pre = in.pointers<scalar_t>(relu);
    // The per-channel means sum / count, divided once here rather than by the caller.
    const auto mean_dz = per_element<acc_t>(stats.sum_dz, count);
    const auto mean_dz_xhat = per_element<acc_t>(stats.sum_dz_xhat, count);
    const auto mean_dz_rhat = per_element<acc_t>(stats.sum_dz_rhat, count);
    const auto grad = [&](const acc_t* bn_scale, const Tensor& m, const Tensor& istd,
                          const std::vector<acc_t>& mean_dz_vhat) {
      return BnGrad<acc_t>{bn_scale, ptr_or_null<acc_t>(m), ptr_or_null<acc_t>(istd), data_or_null(mean_dz),
                           data_or_null(mean_dz_vhat)};
    };
    const auto x_grad = grad(pre.scale, stats.norm.mean, stats.norm.invstd, mean_dz_xhat);
    const auto r_grad = grad(pre.res_scale, stats.norm.res_mean, stats.norm.res_invstd, mean_dz_rhat);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gr = pre.residual ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    for_each_vector<scalar_t>(lay, [&](int64_t offset, int64_t n, const auto& param) {
      const auto xv = pre.load_x(offset, n), rv = pre.load_residual(offset, n);
      const auto dz = pre.dz(L::load(gp + offset, n), xv, rv, param);
      L::store(gx + offset, x_grad(dz, xv, param), n);
      if (gr) L::store(gr + offset, r_grad(dz, rv, param), n);
    });
  });
  return {grad_x, grad_residual};
}

// t's values in the accumulation type A, whatever t's floating dtype (t is contiguous).
template <typename A>
std::vector<A> values_as(const Tensor& t) {
  std::vector<A> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bn_finalize", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<A>(p[i]);
  });
  return out;
}

// Stores v into t (contiguous), rounded to t's dtype.
template <typename A>
void store_values(const Tensor& t, const std::vector<A>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bn_finalize", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                               const OptTensor& bias, const OptTensor& running_mean,
                                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                               int64_t count, std::optional<double> momentum, double eps,
                                               bool update) {
  const FinalizeArgs a = finalize_args("pyfast.bn_finalize", mean, var, weight, bias, running_mean, running_var,
                                       num_batches_tracked, count, momentum, eps, update);
  int64_t tracked = 0;  // num_batches_tracked after this call's increment
  if (a.num_batches_tracked.defined()) tracked = ++*a.num_batches_tracked.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scale.scalar_type(), "bn_finalize", [&] {
    using A = scalar_t;
    const auto m = values_as<A>(a.mean), v = values_as<A>(a.var);
    const auto w = a.weight.defined() ? values_as<A>(a.weight) : std::vector<A>();
    const auto b = a.bias.defined() ? values_as<A>(a.bias) : std::vector<A>();
    A* scale = a.scale.mutable_data_ptr<A>();
    A* shift = a.shift.mutable_data_ptr<A>();
    A* invstd = a.invstd.mutable_data_ptr<A>();
    for (size_t c = 0; c < m.size(); ++c) {
      invstd[c] = A(1) / std::sqrt(v[c] + static_cast<A>(a.eps));
      scale[c] = w.empty() ? invstd[c] : w[c] * invstd[c];
      shift[c] = (b.empty() ? A(0) : b[c]) - m[c] * scale[c];
    }
    if (!a.running_mean.defined()) return;
    // nn.BatchNorm2d's update: an exponential (momentum) or cumulative average, with the unbiased variance.
    const A f = a.momentum ? static_cast<A>(*a.momentum) : A(1) / static_cast<A>(tracked);
    const A bessel = static_cast<A>(a.count) / static_cast<A>(std::max<int64_t>(a.count - 1, 1));
    auto rm = values_as<A>(a.running_mean), rv = values_as<A>(a.running_var);
    for (size_t c = 0; c < m.size(); ++c) {
      rm[c] += f * (m[c] - rm[c]);
      rv[c] += f * (v[c] * bessel - rv[c]);
    }
    store_values(a.running_mean, rm);
    store_values(a.running_var, rv);
  });
  return {a.scale, a.shift, a.invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_forward_", &bn_act_forward_);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt);
  m.impl("bn_finalize", &bn_finalize);
}

}  // namespace pyfast
