// CPU kernels of the five BN primitives; their semantics are docs/ARCHITECTURE.md, section 1.
//
// Memory is walked as [outer][C][inner] (Layout): NCHW as planes holding one channel each,
// channels_last as rows holding every channel. An op computes its per-channel coefficients once per
// call (Coefs); both walks hand its per-vector math those of the vector's lanes: broadcast once per
// plane, loaded across a row. So each op's math is written once, and compiled once per combination
// of its options (ReLU, residual, batch statistics) rather than branching on them per vector.
// Reductions fold vectors into per-lane accumulators in the accumulation type (merged lane by lane
// along a plane walk), then combine lanes and blocks in double in a fixed order: results do not
// depend on the number of threads.
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
#include <type_traits>
#include <vector>

#include "../batch_norm_args.h"

namespace pyfast {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using at::vec::VectorizedN;

constexpr int64_t kGrain = 32768;  // elements per parallel task, ATen's own grain size
constexpr int64_t kReduceBlock = 65536;  // elements per block of a reduction: rows, or planes of one channel

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

// The lane count of a whole vector, as a type: loads and stores of whole vectors then compile to one
// instruction, without the run-time count test (and memcpy) of a partial one.
struct Whole {};

// One vector of scalar_t lanes, computed on in the accumulation type: 8 floats or 4 doubles, or 16
// bf16/fp16 values widened into two float vectors (widths for AVX2).
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kParts = Vectorized<scalar_t>::size() / Vectorized<acc_t>::size();
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();
  using Vec = VectorizedN<acc_t, kParts>;

  // n: Whole, or the count of the first lanes to read (the others read as 0).
  template <typename N>
  C10_ALWAYS_INLINE static Vec load(const scalar_t* p, N n) {
    Vectorized<scalar_t> v;
    if constexpr (std::is_same_v<N, Whole>) {
      v = Vectorized<scalar_t>::loadu(p);
    } else {
      v = Vectorized<scalar_t>::loadu(p, static_cast<int>(n));
    }
    return at::vec::convert<acc_t, kParts, scalar_t, 1>(VectorizedN<scalar_t, 1>(v));
  }
  template <typename N>
  C10_ALWAYS_INLINE static void store(scalar_t* p, const Vec& v, N n) {
    const auto out = at::vec::convert<scalar_t, 1, acc_t, kParts>(v);
    if constexpr (std::is_same_v<N, Whole>) {
      out.store(p);
    } else {
      out.store(p, static_cast<int>(n));
    }
  }
  // kSize per-channel values of the accumulation type (VectorizedN::loadu is not always inlined).
  C10_ALWAYS_INLINE static Vec load_acc(const acc_t* p) {
    constexpr int64_t kPart = Vectorized<acc_t>::size();
    Vec v;
    for (int i = 0; i < kParts; ++i) v[i] = Vectorized<acc_t>::loadu(p + i * kPart);
    return v;
  }
};

// K per-channel coefficients of an op's inner loop, computed once per call: the table the walks read
// them from, each row padded to whole vectors so that a row of channels loads them at constant size.
template <typename scalar_t, int K>
struct Coefs {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vecs = std::array<typename L::Vec, K>;

  int64_t stride;
  std::vector<acc_t> table;  // [K][stride]

  explicit Coefs(int64_t channels) : stride(at::ceil_div(channels, L::kSize) * L::kSize), table(K * stride) {}

  acc_t* operator[](int k) { return table.data() + k * stride; }
  const acc_t* operator[](int k) const { return table.data() + k * stride; }
  // Row k as t's values (contiguous, acc_t), or `none` everywhere for an undefined t.
  void set(int k, const Tensor& t, acc_t none) {
    if (t.defined()) {
      std::copy_n(t.const_data_ptr<acc_t>(), t.numel(), (*this)[k]);
    } else {
      std::fill_n((*this)[k], stride, none);
    }
  }

  // What the walks read the table through, a copy in each task: the outputs' vector stores may alias
  // any memory, so the compiler would reload a pointer it reads from memory after every store.
  struct View {
    const acc_t* table;
    int64_t stride;
    // Channel c's coefficients in every lane (a plane).
    C10_ALWAYS_INLINE Vecs broadcast(int64_t c) const {
      Vecs v;
      for (int k = 0; k < K; ++k) v[k] = typename L::Vec(table[k * stride + c]);
      return v;
    }
    // Channels [c, c + kSize) in the lanes (a row).
    C10_ALWAYS_INLINE Vecs load(int64_t c) const {
      Vecs v;
      for (int k = 0; k < K; ++k) v[k] = L::load_acc(table + k * stride + c);
      return v;
    }
  };
  View view() const { return {table.data(), stride}; }
};

// Calls whole(i) for the vectors i = 0, S, 2S, ... of a line [0, len), then takes the tail of
// len % S elements: as the whole vector that ends at len (overlapping the one before: a reduction keeps
// only its new lanes) where len >= S, else as part(i, n) of its n first lanes.
template <int64_t S, typename WholeFn, typename PartFn>
C10_ALWAYS_INLINE void walk_line(int64_t len, const WholeFn& whole, const PartFn& part) {
  const int64_t full = len / S * S;
  for (int64_t i = 0; i < full; i += S) whole(i);
  if (full == len) return;
  if (len >= S) {
    whole(len - S);
  } else {
    part(full, len - full);
  }
}

// A map's walk of a line [0, len): vec(i, n) computes the outputs of the vector at i (n: Whole, or its
// lane count) from its inputs and returns the stores that write them. The tail of len % S elements, where
// len >= S, is the whole vector that ends at len, computed before the line's first store and stored after
// its last: its first lanes, which the vector before also covers, get the same values twice, so the map
// may write its input in place. (Stored as a partial vector, the tail's masked store would stall the next
// line's first load, which cannot take its data from that store: on 7x7 planes, over a third of the pass.)
template <int64_t S, typename VecFn>
C10_ALWAYS_INLINE void map_line(int64_t len, const VecFn& vec) {
  const int64_t full = len / S * S;
  if (full == len || len < S) {
    for (int64_t i = 0; i < full; i += S) vec(i, Whole{})();
    if (full != len) vec(full, len - full)();
    return;
  }
  const auto store_tail = vec(len - S, Whole{});
  for (int64_t i = 0; i < full; i += S) vec(i, Whole{})();
  store_tail();
}

// Runs fn(offset, n, coefs) on every vector of the layout, in parallel, and then the stores it returns (see
// map_line): n is Whole or a lane count, coefs the vector's per-channel coefficients (broadcast once per
// plane, loaded per vector of a row).
template <typename scalar_t, int K, typename Fn>
void map_vectors(const Layout& lay, const Coefs<scalar_t, K>& coefs, const Fn& fn) {
  constexpr int64_t S = Lanes<scalar_t>::kSize;
  const int64_t units = lay.planes() ? lay.outer * lay.channels : lay.outer;
  const int64_t unit_size = lay.planes() ? lay.inner : lay.channels;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrain / std::max<int64_t>(unit_size, 1)), [&](int64_t b, int64_t e) {
    const Fn f = fn;  // its pointers in registers (see Coefs::View)
    const auto k = coefs.view();
    if (lay.planes()) {
      // the plane's channel counted along rather than divided out of u: a 64-bit division per plane was a
      // sixth of a pass over 4x4 planes
      for (int64_t u = b, c = b % lay.channels; u < e; ++u, c = c + 1 == lay.channels ? 0 : c + 1) {
        const int64_t base = u * unit_size;
        const auto p = k.broadcast(c);
        map_line<S>(lay.inner, [&](int64_t i, auto n) { return f(base + i, n, p); });
      }
      return;
    }
    for (int64_t u = b; u < e; ++u) {
      const int64_t base = u * unit_size;
      map_line<S>(lay.channels, [&](int64_t c, auto n) { return f(base + c, n, k.load(c)); });
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
C10_ALWAYS_INLINE State<scalar_t, K> zero_state() {
  State<scalar_t, K> s;
  s.fill(typename Lanes<scalar_t>::Vec(0));
  return s;
}

// Lanes [first, last) of s, over n elements each, as Partials appended at out.
template <typename scalar_t, int K>
Partial<K>* store_lanes(const State<scalar_t, K>& s, int64_t first, int64_t last, int64_t n, Partial<K>* out) {
  using L = Lanes<scalar_t>;
  std::array<std::array<typename L::acc_t, L::kSize>, K> values;
  for (int k = 0; k < K; ++k) s[k].store(values[k].data());
  for (int64_t j = first; j < last; ++j, ++out) {
    out->n = static_cast<double>(n);
    for (int k = 0; k < K; ++k) out->v[k] = values[k][j];
  }
  return out;
}

// Folds planes [n0, n1) of channel c into one Partial. step(state, inv_n, offset, n, coefs) folds
// one vector into per-lane accumulators (inv_n = 1 / the lanes' count after this step, for Welford);
// merge(a, n_a, b, n_b) folds two states of n_a and n_b elements per lane into one; combine(parts,
// count, stride) folds Partials into one. Every plane has the same shape, so each accumulator's lanes
// keep one count: a plane's groups of kChains whole vectors go to the kChains chains, the whole
// vectors after its last group to the rest states (one per position), its tail to the tail state.
// The whole-vector states are merged lane by lane before their lanes go to combine: a channel of
// short planes has few elements per lane, and combining kChains x kSize lanes would cost more than
// reducing them.
template <typename scalar_t, int K, int KC, typename Step, typename Merge, typename Combine>
Partial<K> reduce_planes(const Layout& lay, int64_t c, int64_t n0, int64_t n1, const Coefs<scalar_t, KC>& coefs,
                         const Step& step, const Merge& merge, const Combine& combine) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  constexpr int64_t S = L::kSize;
  const auto p = coefs.view().broadcast(c);
  const int64_t len = lay.inner, groups = len / S / kChains, rest = len / S % kChains, tail = len % S;
  const bool overlap = len >= S;
  // rest < kChains; every state is indexed by a constant (loops of constant bounds), so that the states
  // can stay in registers
  std::array<State<scalar_t, K>, kChains> chains, rests;
  for (int u = 0; u < kChains; ++u) chains[u] = rests[u] = zero_state<scalar_t, K>();
  State<scalar_t, K> last = zero_state<scalar_t, K>();
  int64_t group_count = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * lay.channels + c) * len;
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t inv_n = acc_t(1) / acc_t(++group_count);
      const int64_t offset = base + g * kChains * S;
      for (int u = 0; u < kChains; ++u) chains[u] = step(chains[u], inv_n, offset + u * S, Whole{}, p);
    }
    const acc_t inv_n = acc_t(1) / acc_t(n - n0 + 1);
    for (int u = 0; u < kChains - 1; ++u) {
      if (u < rest) rests[u] = step(rests[u], inv_n, base + (groups * kChains + u) * S, Whole{}, p);
    }
    if (tail == 0) continue;
    last = overlap ? step(last, inv_n, base + len - S, Whole{}, p) : step(last, inv_n, base + len - tail, tail, p);
  }
  State<scalar_t, K> whole = zero_state<scalar_t, K>();
  int64_t whole_count = 0;
  const auto add = [&](const State<scalar_t, K>& s, int64_t n) {
    whole = whole_count == 0 ? s : merge(whole, acc_t(whole_count), s, acc_t(n));
    whole_count += n;
  };
  for (int u = 0; u < kChains; ++u) {
    if (groups > 0) add(chains[u], group_count);
  }
  for (int u = 0; u < kChains - 1; ++u) {
    if (u < rest) add(rests[u], n1 - n0);
  }
  std::array<Partial<K>, 2 * S> parts;
  Partial<K>* end = parts.data();
  if (whole_count > 0) end = store_lanes<scalar_t, K>(whole, 0, S, whole_count, end);
  if (tail > 0) end = store_lanes<scalar_t, K>(last, overlap ? S - tail : 0, overlap ? S : tail, n1 - n0, end);
  return combine(parts.data(), end - parts.data(), 1);
}

// Folds rows [r0, r1) of a rows layout into out[0, C): per-thread channel accumulators, lane j of
// states[i] being channel i * S + j (the tail state's, where it overlaps, C - S + j). Consecutive
// vectors of a row update different states, so no chains are needed here.
template <typename scalar_t, int K, int KC, typename Step>
void reduce_rows(const Layout& lay, int64_t r0, int64_t r1, const Coefs<scalar_t, KC>& coefs, const Step& step,
                 Partial<K>* out) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  constexpr int64_t S = L::kSize;
  const int64_t C = lay.channels, tail = C % S;
  std::vector<State<scalar_t, K>> states(at::ceil_div(C, S), zero_state<scalar_t, K>());
  const auto k = coefs.view();
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t inv_n = acc_t(1) / acc_t(r - r0 + 1);
    auto* s = states.data();
    walk_line<S>(
        C,
        [&](int64_t c) {
          *s = step(*s, inv_n, r * C + c, Whole{}, k.load(c));
          ++s;
        },
        [&](int64_t c, int64_t n) { *s = step(*s, inv_n, r * C + c, n, k.load(c)); });
  }
  const int64_t full = C / S;
  for (int64_t i = 0; i < full; ++i) store_lanes<scalar_t, K>(states[i], 0, S, r1 - r0, out + i * S);
  if (tail == 0) return;
  const bool overlap = C >= S;
  store_lanes<scalar_t, K>(states[full], overlap ? S - tail : 0, overlap ? S : tail, r1 - r0, out + full * S);
}

// One Partial per channel (see reduce_planes for step, merge and combine). Blocks (runs of planes of
// one channel, or of rows) are reduced in parallel into a [block][channel] table whose columns are then
// combined, in a fixed order: blocks do not depend on the number of threads.
template <typename scalar_t, int K, int KC, typename Step, typename Merge, typename Combine>
std::vector<Partial<K>> reduce_channels(const Layout& lay, const Coefs<scalar_t, KC>& coefs, const Step& step,
                                        const Merge& merge, const Combine& combine) {
  const int64_t C = lay.channels;
  std::vector<Partial<K>> blocks;
  if (lay.planes()) {
    const int64_t planes_per_block = std::clamp<int64_t>(kReduceBlock / lay.inner, 1, std::max<int64_t>(lay.outer, 1));
    const int64_t n_blocks = at::ceil_div(lay.outer, planes_per_block);
    blocks.resize(n_blocks * C);
    const int64_t grain = std::max<int64_t>(1, kGrain / (planes_per_block * lay.inner));
    at::parallel_for(0, n_blocks * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n0 = t / C * planes_per_block, n1 = std::min(n0 + planes_per_block, lay.outer);
        blocks[t] = reduce_planes<scalar_t, K>(lay, t % C, n0, n1, coefs, step, merge, combine);
      }
    });
  } else {
    const int64_t rows_per_block = at::ceil_div(kReduceBlock, std::max<int64_t>(C, 1));
    blocks.resize(at::ceil_div(lay.outer, rows_per_block) * C);
    at::parallel_for(0, at::ceil_div(lay.outer, rows_per_block), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t r0 = k * rows_per_block, r1 = std::min(r0 + rows_per_block, lay.outer);
        reduce_rows<scalar_t, K>(lay, r0, r1, coefs, step, &blocks[k * C]);
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
// The pre-activation and its gradient, specialized at compile time

// What a residual contributes to z: nothing, residual*res_scale + res_shift, or that and its own BN's
// gradient (batch statistics for the residual: res_mean in reduce, sum_dz_rhat in elemt).
enum class Residual { kNone, kAffine, kNormalized };

// Calls fn(constant) with b as a std::bool_constant, so that fn's loops are compiled once per value.
template <typename Fn>
void with_bool(bool b, const Fn& fn) {
  if (b) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

template <typename Fn>
void with_residual(Residual r, const Fn& fn) {
  using R = Residual;
  switch (r) {
    case R::kNone: return fn(std::integral_constant<R, R::kNone>{});
    case R::kAffine: return fn(std::integral_constant<R, R::kAffine>{});
    case R::kNormalized: return fn(std::integral_constant<R, R::kNormalized>{});
  }
}

// The first coefficients of every op that computes z; the ops' own ones follow.
enum PreActCoef { kScale, kShift, kResScale, kResShift, kPreActCoefs };

// z = x*scale + shift [+ r*res_scale + res_shift]
template <bool kResidual, typename Vec, typename P>
C10_ALWAYS_INLINE Vec pre_act(const Vec& x, const Vec& r, const P& p) {
  const Vec z = at::vec::fmadd(x, p[kScale], p[kShift]);
  if constexpr (kResidual) {
    return z + at::vec::fmadd(r, p[kResScale], p[kResShift]);
  } else {
    return z;
  }
}

// Under the ReLU, grad_out except where z <= 0: a NaN z lets the gradient through, as torch.relu's
// backward (threshold_backward) does.
template <bool kRelu, typename Vec>
C10_ALWAYS_INLINE Vec act_grad(const Vec& g, const Vec& z) {
  if constexpr (kRelu) {
    return Vec::blendv(g, Vec(0), z <= Vec(0));
  } else {
    return g;
  }
}

// The tensors that define z, in x's layout; a None scale/shift is an undefined tensor.
struct PreActInputs {
  Tensor x, residual, scale, shift, res_scale, res_shift;

  explicit PreActInputs(const PreActTensors& t)
      : x(t.x), residual(t.residual), scale(t.scale), shift(t.shift), res_scale(t.res_scale), res_shift(t.res_shift) {}

  // A table of K coefficients whose first kPreActCoefs are z's; None reads as ones (scales), zeros (shifts).
  template <typename scalar_t, int K>
  Coefs<scalar_t, K> coefs() const {
    Coefs<scalar_t, K> k(x.size(1));
    k.set(kScale, scale, 1);
    k.set(kShift, shift, 0);
    k.set(kResScale, res_scale, 1);
    k.set(kResShift, res_shift, 0);
    return k;
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
    Coefs<scalar_t, 1> shift(lay.channels);
    if (x.numel() > 0) {
      for (int64_t c = 0; c < lay.channels; ++c) {
        const auto value = static_cast<acc_t>(data[c * x.stride(1)]);
        shift[0][c] = std::isfinite(value) ? value : acc_t(0);
      }
    }
    const auto welford = [data](const State<scalar_t, 2>& s, acc_t inv_n, int64_t offset, auto n, const auto& p) {
      const auto v = L::load(data + offset, n) - p[0];
      const auto delta = v - s[0];
      const auto m = at::vec::fmadd(delta, typename L::Vec(inv_n), s[0]);
      return State<scalar_t, 2>{m, at::vec::fmadd(delta, v - m, s[1])};
    };
    // Chan's combination of two lanes' (mean, M2), in the accumulation type.
    const auto merge = [](const State<scalar_t, 2>& a, acc_t n_a, const State<scalar_t, 2>& b, acc_t n_b) {
      const acc_t n = n_a + n_b;
      const auto delta = b[0] - a[0];
      return State<scalar_t, 2>{at::vec::fmadd(delta, typename L::Vec(n_b / n), a[0]),
                                at::vec::fmadd(delta * delta, typename L::Vec(n_a * n_b / n), a[1] + b[1])};
    };
    const auto stats = reduce_channels<scalar_t, 2>(lay, shift, welford, merge, chan_combine);
    auto* m = mean.mutable_data_ptr<acc_t>();
    auto* v = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < lay.channels; ++c) {
      m[c] = shift[0][c] + stats[c].v[0];  // NaN for no elements, as torch.var_mean
      v[c] = stats[c].v[1] / stats[c].n;
    }
  });
  return {mean, var};
}

// Writes act(z) into out: a fresh tensor, or x itself for the in-place variant (a pure map: each element
// is read before it is written, by the same lane, and only once).
void act_forward_into(const PreActInputs& in, const Layout& lay, bool relu, const Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "bn_act_forward", [&] {
    using L = Lanes<scalar_t>;
    const auto coefs = in.coefs<scalar_t, kPreActCoefs>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(in.residual);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    with_bool(relu, [&](auto relu_t) {
      with_bool(rp != nullptr, [&](auto residual_t) {
        constexpr bool kRelu = decltype(relu_t)::value, kResidual = decltype(residual_t)::value;
        map_vectors<scalar_t>(lay, coefs, [=](int64_t offset, auto n, const auto& p) {
          const auto xv = L::load(xp + offset, n);
          const auto z = pre_act<kResidual>(xv, kResidual ? L::load(rp + offset, n) : xv, p);
          // maximum() propagates NaN, as torch.relu does
          const auto a = kRelu ? at::vec::maximum(z, typename L::Vec(0)) : z;
          return [=] { L::store(o + offset, a, n); };
        });
      });
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

Tensor& bn_act_forward_(Tensor& x, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                        const OptTensor& res_scale, const OptTensor& res_shift, bool relu) {
  constexpr const char* op = "pyfast.bn_act_forward_";
  check_input(op, x);
  const Layout lay = layout_of(x);
  const PreActInputs in(pre_act_tensors(op, x, !lay.planes(), scale, shift, residual, res_scale, res_shift));
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
  const Residual res = !in.residual.defined()      ? Residual::kNone
                       : stats.res_mean.defined() ? Residual::kNormalized
                                                  : Residual::kAffine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_reduce", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    enum { kMean = kPreActCoefs, kResMean, kCoefs };
    auto coefs = in.coefs<scalar_t, kCoefs>();
    coefs.set(kMean, stats.mean, 0);
    coefs.set(kResMean, stats.res_mean, 0);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(in.residual);
    std::vector<Partial<3>> total;
    with_bool(relu, [&](auto relu_t) {
      with_residual(res, [&](auto res_t) {
        constexpr bool kRelu = decltype(relu_t)::value;
        constexpr Residual kRes = decltype(res_t)::value;
        constexpr bool kResidual = kRes != Residual::kNone;
        // Sums dz, dz*(x - mean) and dz*(r - res_mean); invstd is applied once per channel below.
        const auto sums = [=](const State<scalar_t, 3>& s, acc_t, int64_t offset, auto n, const auto& p) {
          const auto xv = L::load(xp + offset, n);
          const auto rv = kResidual ? L::load(rp + offset, n) : xv;
          const auto dz = act_grad<kRelu>(L::load(gp + offset, n), pre_act<kResidual>(xv, rv, p));
          return State<scalar_t, 3>{
              s[0] + dz, at::vec::fmadd(dz, xv - p[kMean], s[1]),
              kRes == Residual::kNormalized ? at::vec::fmadd(dz, rv - p[kResMean], s[2]) : s[2]};
        };
        const auto add = [](const State<scalar_t, 3>& a, acc_t, const State<scalar_t, 3>& b, acc_t) {
          return State<scalar_t, 3>{a[0] + b[0], a[1] + b[1], a[2] + b[2]};
        };
        total = reduce_channels<scalar_t, 3>(lay, coefs, sums, add, sum_combine);
      });
    });
    const acc_t* istd = stats.invstd.const_data_ptr<acc_t>();
    const acc_t* ristd = ptr_or_null<acc_t>(stats.res_invstd);
    auto *s0 = sum_dz.mutable_data_ptr<acc_t>(), *s1 = sum_dz_xhat.mutable_data_ptr<acc_t>();
    auto* s2 = sum_dz_rhat.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < lay.channels; ++c) {
      s0[c] = total[c].v[0];
      s1[c] = total[c].v[1] * istd[c];
      if (ristd) s2[c] = total[c].v[2] * ristd[c];
    }
  });
  return {sum_dz, sum_dz_xhat, sum_dz_rhat};
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
  const Residual res = !in.residual.defined()         ? Residual::kNone
                       : stats.sum_dz_rhat.defined() ? Residual::kNormalized
                                                     : Residual::kAffine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_elemt", [&] {
    using L = Lanes<scalar_t>;
    using acc_t = typename L::acc_t;
    // With batch statistics, the gradient through v (x or the residual) with a = scale*invstd:
    //   scale*(dz - mean_dz - (v - mean)*invstd*mean_dz_vhat) = dz*scale + ((v - mean)*k1 + k0),
    //   k1 = -a*mean_dz_vhat, k0 = -scale*mean_dz (mean_dz = sum_dz / count etc., per channel, once here).
    // Without them: dz*scale.
    enum { kMean = kPreActCoefs, kK1, kK0, kResMean, kResK1, kResK0, kCoefs };  // each mean, then its k1, k0
    auto coefs = in.coefs<scalar_t, kCoefs>();
    const bool batch_stats = stats.sum_dz.defined();
    const auto fill_grad = [&](int scale_row, int mean_row, const Tensor& m, const Tensor& istd, const Tensor& s_vhat) {
      coefs.set(mean_row, m, 0);
      if (!s_vhat.defined()) return;
      const acc_t *sd = stats.sum_dz.const_data_ptr<acc_t>(), *sv = s_vhat.const_data_ptr<acc_t>();
      const acc_t* is = istd.const_data_ptr<acc_t>();
      const acc_t n = static_cast<acc_t>(count);
      for (int64_t c = 0; c < lay.channels; ++c) {
        const acc_t sc = coefs[scale_row][c];
        coefs[mean_row + 1][c] = -sc * is[c] * (sv[c] / n);
        coefs[mean_row + 2][c] = -sc * (sd[c] / n);
      }
    };
    fill_grad(kScale, kMean, stats.norm.mean, stats.norm.invstd, stats.sum_dz_xhat);
    fill_grad(kResScale, kResMean, stats.norm.res_mean, stats.norm.res_invstd, stats.sum_dz_rhat);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(in.residual);
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gr = rp ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    with_bool(relu, [&](auto relu_t) {
      with_bool(batch_stats, [&](auto batch_stats_t) {
        with_residual(res, [&](auto res_t) {
          constexpr bool kRelu = decltype(relu_t)::value, kBatchStats = decltype(batch_stats_t)::value;
          constexpr Residual kRes = decltype(res_t)::value;
          constexpr bool kResidual = kRes != Residual::kNone;
          map_vectors<scalar_t>(lay, coefs, [=](int64_t offset, auto n, const auto& p) {
            const auto xv = L::load(xp + offset, n);
            const auto rv = kResidual ? L::load(rp + offset, n) : xv;
            const auto dz = act_grad<kRelu>(L::load(gp + offset, n), pre_act<kResidual>(xv, rv, p));
            const auto dx = kBatchStats ? at::vec::fmadd(dz, p[kScale], at::vec::fmadd(xv - p[kMean], p[kK1], p[kK0]))
                                        : dz * p[kScale];
            const auto dr = kRes == Residual::kNormalized
                                ? at::vec::fmadd(dz, p[kResScale], at::vec::fmadd(rv - p[kResMean], p[kResK1], p[kResK0]))
                                : dz * p[kResScale];
            return [=] {
              L::store(gx + offset, dx, n);
              if constexpr (kResidual) L::store(gr + offset, dr, n);
            };
          });
        });
      });
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
