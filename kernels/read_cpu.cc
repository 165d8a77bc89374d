// memory_read's CPU kernels (kernels/read.py has the op's contract, read_cpu.py the Python side):
// XLA FFI handlers for XLA:CPU, one pass over the positions of each head for the forward and one
// for the backward.
//
//   adaptor_read_fwd  (h, pos, weight, gamma, scale) -> out
//   adaptor_read_bwd  (h, pos, weight, gamma, scale, d_out)
//                     -> (dh, d_pos, d_weight, d_gamma per image, d_scale)
//   h, out, dh, d_out: (batch, L, G, C);  pos, weight, d_pos, d_weight: (batch, K, G, L);
//   gamma: (G, C) or empty;  scale, d_scale: (batch, G, L) or empty;  d_gamma: (batch, G, C).
//   All float32; an empty gamma or scale means the op was called without it.
//
// Why: XLA:CPU runs the xla path's row gathers and scatter-adds as generic loops, one index
// vector at a time. Here a head's rows h[b, :, g, :] (L x C floats: 300 KB at the booster's
// first stage) stay in cache while all K locations of every position are read, the backward
// accumulates into dh in place, and the heads (batch x G of them) are shared out over the
// intra-op thread pool: every head reads and writes only its own rows, so nothing is contended.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t batch, length, heads, channels, points;
};

// Calls fn(0 .. n-1) on the caller's thread and the pool's: tasks take the next index until none
// is left, and the caller waits only for indices that another thread has taken (so it never
// waits on a task that has not started). A task that starts after the last index is taken
// returns at once; the state it needs is shared.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == n) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

// The two rows a location reads and their weights, as kernels/read.py's `taps`.
struct Tap {
  int64_t p0, p1;
  float f;
};

// A NaN location reads row 0 (its weights are NaN): no index outside the head's rows is formed.
inline Tap TapOf(float p, int64_t length) {
  const float floor = std::floor(p);
  const float last = static_cast<float>(length - 1);
  const int64_t p0 = floor >= 0.0f ? static_cast<int64_t>(std::min(floor, last)) : 0;
  return {p0, std::min<int64_t>(p0 + 1, length - 1), p - floor};
}

// One head's forward: out[i] = (h[i] + gamma * read[i]) * scale[i], or read[i] * scale[i].
__attribute__((target_clones("arch=haswell", "default")))
void ForwardHead(const Shape& s, int64_t b, int64_t g, const float* h, const float* pos,
                 const float* weight, const float* gamma, const float* scale, float* out) {
  const int64_t L = s.length, G = s.heads, C = s.channels, K = s.points;
  std::vector<float> acc(C);
  const float* h_b = h + b * L * G * C + g * C;  // row i of the head: h_b + i * G * C
  float* out_b = out + b * L * G * C + g * C;
  const float* gamma_g = gamma ? gamma + g * C : nullptr;
  for (int64_t i = 0; i < L; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = ((b * K + k) * G + g) * L + i;
      const Tap t = TapOf(pos[at], L);
      const float w0 = weight[at] * (1.0f - t.f), w1 = weight[at] * t.f;
      const float* r0 = h_b + t.p0 * G * C;
      const float* r1 = h_b + t.p1 * G * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += w0 * r0[c] + w1 * r1[c];
    }
    const float sc = scale ? scale[(b * G + g) * L + i] : 1.0f;
    const float* h_i = h_b + i * G * C;
    float* o = out_b + i * G * C;
    if (gamma_g) {
      for (int64_t c = 0; c < C; ++c) o[c] = (h_i[c] + gamma_g[c] * acc[c]) * sc;
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = acc[c] * sc;
    }
  }
}

// One head's backward (kernels/read.py's docstring has the formulas). dh starts from the
// residual path (d_out * scale with gamma, else zero) for every position before any location
// adds to it.
__attribute__((target_clones("arch=haswell", "default")))
void BackwardHead(const Shape& s, int64_t b, int64_t g, const float* h, const float* pos,
                  const float* weight, const float* gamma, const float* scale,
                  const float* d_out, float* dh, float* d_pos, float* d_weight,
                  float* d_gamma, float* d_scale) {
  const int64_t L = s.length, G = s.heads, C = s.channels, K = s.points;
  const int64_t row = G * C;
  const int64_t base = b * L * G * C + g * C;
  const float* h_b = h + base;
  const float* d_out_b = d_out + base;
  float* dh_b = dh + base;
  const float* gamma_g = gamma ? gamma + g * C : nullptr;
  float* d_gamma_bg = d_gamma + (b * G + g) * C;
  auto sc_at = [&](int64_t i) { return scale ? scale[(b * G + g) * L + i] : 1.0f; };
  for (int64_t i = 0; i < L; ++i) {
    float* d = dh_b + i * row;
    if (gamma_g) {
      const float sc = sc_at(i);
      const float* e = d_out_b + i * row;
      for (int64_t c = 0; c < C; ++c) d[c] = sc * e[c];
    } else {
      std::fill(d, d + C, 0.0f);
    }
  }
  std::fill(d_gamma_bg, d_gamma_bg + C, 0.0f);
  std::vector<float> g_out(C), read(C);
  for (int64_t i = 0; i < L; ++i) {
    const float sc = sc_at(i);
    const float* e = d_out_b + i * row;
    for (int64_t c = 0; c < C; ++c) g_out[c] = gamma_g ? e[c] * gamma_g[c] : e[c];
    std::fill(read.begin(), read.end(), 0.0f);
    float d_sc = 0.0f;  // the read's part of h' . d out
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = ((b * K + k) * G + g) * L + i;
      const Tap t = TapOf(pos[at], L);
      const float w = weight[at];
      const float w0 = w * (1.0f - t.f), w1 = w * t.f;
      const float* r0 = h_b + t.p0 * row;
      const float* r1 = h_b + t.p1 * row;
      float* d0 = dh_b + t.p0 * row;
      float* d1 = dh_b + t.p1 * row;
      float e0 = 0.0f, e1 = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        e0 += r0[c] * g_out[c];
        e1 += r1[c] * g_out[c];
      }
      const float s0 = sc * w0, s1 = sc * w1;
      for (int64_t c = 0; c < C; ++c) d0[c] += s0 * g_out[c];
      for (int64_t c = 0; c < C; ++c) d1[c] += s1 * g_out[c];
      if (gamma_g) {
        for (int64_t c = 0; c < C; ++c) read[c] += w0 * r0[c] + w1 * r1[c];
      }
      const float lerp = (1.0f - t.f) * e0 + t.f * e1;
      d_pos[at] = sc * w * (e1 - e0);
      d_weight[at] = sc * lerp;
      d_sc += w * lerp;
    }
    if (gamma_g) {
      const float* h_i = h_b + i * row;
      for (int64_t c = 0; c < C; ++c) {
        d_gamma_bg[c] += e[c] * sc * read[c];
        d_sc += h_i[c] * e[c];
      }
    }
    if (scale) d_scale[(b * G + g) * L + i] = d_sc;
  }
}

// The op's shape from h (batch, L, G, C) and pos (batch, K, G, L); an error names what differs.
ffi::Error ShapeOf(ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> pos,
                   ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> gamma,
                   ffi::Buffer<ffi::F32> scale, Shape* s) {
  auto hd = h.dimensions(), pd = pos.dimensions();
  if (hd.size() != 4 || pd.size() != 4) {
    return ffi::Error::InvalidArgument("adaptor_read: h and pos must be 4-D");
  }
  *s = {hd[0], hd[1], hd[2], hd[3], pd[1]};
  if (pd[0] != s->batch || pd[2] != s->heads || pd[3] != s->length ||
      weight.dimensions().size() != 4 || weight.element_count() != pos.element_count()) {
    return ffi::Error::InvalidArgument(
        "adaptor_read: pos and weight must be (batch, K, G, L) for h (batch, L, G, C)");
  }
  const int64_t n_gamma = gamma.element_count(), n_scale = scale.element_count();
  if (n_gamma && n_gamma != s->heads * s->channels) {
    return ffi::Error::InvalidArgument("adaptor_read: gamma must be (G, C) or empty");
  }
  if (n_scale && n_scale != s->batch * s->heads * s->length) {
    return ffi::Error::InvalidArgument("adaptor_read: scale must be (batch, G, L) or empty");
  }
  return ffi::Error::Success();
}

const float* OrNull(ffi::Buffer<ffi::F32> x) {
  return x.element_count() ? x.typed_data() : nullptr;
}

ffi::Error ReadForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> pos,
                       ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> gamma,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  Shape s;
  if (ffi::Error e = ShapeOf(h, pos, weight, gamma, scale, &s); e.failure()) return e;
  ParallelFor(pool, s.batch * s.heads, [&](int64_t n) {
    ForwardHead(s, n / s.heads, n % s.heads, h.typed_data(), pos.typed_data(),
                weight.typed_data(), OrNull(gamma), OrNull(scale), out->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error ReadBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                        ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::F32> weight,
                        ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dh,
                        ffi::ResultBuffer<ffi::F32> d_pos, ffi::ResultBuffer<ffi::F32> d_weight,
                        ffi::ResultBuffer<ffi::F32> d_gamma,
                        ffi::ResultBuffer<ffi::F32> d_scale) {
  Shape s;
  if (ffi::Error e = ShapeOf(h, pos, weight, gamma, scale, &s); e.failure()) return e;
  float* d_scale_data = d_scale->element_count() ? d_scale->typed_data() : nullptr;
  ParallelFor(pool, s.batch * s.heads, [&](int64_t n) {
    BackwardHead(s, n / s.heads, n % s.heads, h.typed_data(), pos.typed_data(),
                 weight.typed_data(), OrNull(gamma), OrNull(scale), d_out.typed_data(),
                 dh->typed_data(), d_pos->typed_data(), d_weight->typed_data(),
                 d_gamma->typed_data(), d_scale_data);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaptorReadForward, ReadForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaptorReadBackward, ReadBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_pos
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_weight
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_gamma per image
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_scale
);
