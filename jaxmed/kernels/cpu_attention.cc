// Softmax attention for XLA:CPU as an XLA FFI custom call (forward and backward).
//
// Why: XLA:CPU runs the fusions inside a while loop on one core, so the blocked attention
// written in jnp uses half of a 2-core machine; the unblocked one streams the full logits
// through memory. This kernel keeps one row of logits in L1, parallelises over
// (batch x head) groups on XLA's own intra-op thread pool, and recomputes the
// probabilities in the backward pass from the saved log-sum-exp (flash-attention style).
//
// Layouts (float32, any leading dims folded into G):
//   q, o, do, dq: (G, Lq, D)   kt, vt, dkt, dvt: (G, D, Lk)   lse: (G, Lq)
// K and V come transposed so that every inner loop runs over keys with unit stride and
// vectorises for any head dimension D.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxmed::ParallelFor;

// exp for x <= 0 (softmax arguments after subtracting the row max), vectorisable:
// Cephes' expf range reduction and polynomial, about 1 ulp; flushes below -87 to 0.
inline float ExpNonPositive(float x) {
  const bool tiny = x < -87.0f;
  x = std::max(x, -87.0f);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : y * scale;
}

// Maximum of x[0:n] (n >= 1), in 16 lanes so that it vectorises without -ffast-math.
inline float RowMax(const float* x, int64_t n) {
  float lanes[16];
  std::fill(lanes, lanes + 16, x[0]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int t = 0; t < 16; ++t) lanes[t] = std::max(lanes[t], x[j + t]);
  }
  for (; j < n; ++j) lanes[0] = std::max(lanes[0], x[j]);
  return *std::max_element(lanes, lanes + 16);
}

struct Dims {
  int64_t g, lq, lk, d;
};

ffi::Error CheckDims(const ffi::AnyBuffer::Dimensions& q, const ffi::AnyBuffer::Dimensions& kt,
                     Dims* out) {
  if (q.size() < 3 || kt.size() != q.size()) {
    return ffi::Error::InvalidArgument("jaxmed attention: q must be (..., Lq, D) and kt (..., D, Lk)");
  }
  const size_t r = q.size();
  int64_t g = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (q[i] != kt[i]) return ffi::Error::InvalidArgument("jaxmed attention: batch dims differ");
    g *= q[i];
  }
  if (q[r - 1] != kt[r - 2]) {
    return ffi::Error::InvalidArgument("jaxmed attention: head dims of q and kt differ");
  }
  *out = Dims{g, q[r - 2], kt[r - 1], q[r - 1]};
  return ffi::Error::Success();
}

// Query rows per forward work item: enough work per task, enough tasks per thread.
constexpr int64_t kRowsPerTask = 32;

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                        ffi::Buffer<ffi::F32> vt, float scale,
                        ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Dims s;
  if (auto err = CheckDims(q.dimensions(), kt.dimensions(), &s); err.failure()) return err;
  const int64_t chunks = (s.lq + kRowsPerTask - 1) / kRowsPerTask;
  const float* Q = q.typed_data();
  const float* KT = kt.typed_data();
  const float* VT = vt.typed_data();
  float* O = o->typed_data();
  float* LSE = lse->typed_data();
  ParallelFor(pool, s.g * chunks, [&](int64_t item) {
    const int64_t g = item / chunks;
    const int64_t i0 = (item % chunks) * kRowsPerTask;
    const int64_t i1 = std::min(s.lq, i0 + kRowsPerTask);
    const float* kg = KT + g * s.d * s.lk;
    const float* vg = VT + g * s.d * s.lk;
    std::vector<float> row(s.lk);
    float* p = row.data();
    for (int64_t i = i0; i < i1; ++i) {
      const float* qi = Q + (g * s.lq + i) * s.d;
      std::fill(p, p + s.lk, 0.0f);
      for (int64_t d = 0; d < s.d; ++d) {
        const float c = qi[d] * scale;
        const float* kd = kg + d * s.lk;
        for (int64_t j = 0; j < s.lk; ++j) p[j] += c * kd[j];
      }
      const float m = RowMax(p, s.lk);
      float l = 0.0f;
      for (int64_t j = 0; j < s.lk; ++j) {
        p[j] = ExpNonPositive(p[j] - m);
        l += p[j];
      }
      const float inv = 1.0f / l;
      float* oi = O + (g * s.lq + i) * s.d;
      for (int64_t d = 0; d < s.d; ++d) {
        const float* vd = vg + d * s.lk;
        float acc = 0.0f;
        for (int64_t j = 0; j < s.lk; ++j) acc += p[j] * vd[j];
        oi[d] = acc * inv;
      }
      LSE[g * s.lq + i] = m + std::log(l);
    }
  });
  return ffi::Error::Success();
}

// One work item per (batch x head) group: dK and dV sum over every query row of the group,
// so a group is never split between threads.
ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                        ffi::Buffer<ffi::F32> vt, ffi::Buffer<ffi::F32> o,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dkt,
                        ffi::ResultBuffer<ffi::F32> dvt) {
  Dims s;
  if (auto err = CheckDims(q.dimensions(), kt.dimensions(), &s); err.failure()) return err;
  const float* Q = q.typed_data();
  const float* KT = kt.typed_data();
  const float* VT = vt.typed_data();
  const float* O = o.typed_data();
  const float* LSE = lse.typed_data();
  const float* DO = dout.typed_data();
  float* DQ = dq->typed_data();
  float* DKT = dkt->typed_data();
  float* DVT = dvt->typed_data();
  ParallelFor(pool, s.g, [&](int64_t g) {
    const float* kg = KT + g * s.d * s.lk;
    const float* vg = VT + g * s.d * s.lk;
    float* dkg = DKT + g * s.d * s.lk;
    float* dvg = DVT + g * s.d * s.lk;
    std::fill(dkg, dkg + s.d * s.lk, 0.0f);
    std::fill(dvg, dvg + s.d * s.lk, 0.0f);
    std::vector<float> rows(2 * s.lk);
    float* p = rows.data();
    float* ds = p + s.lk;
    for (int64_t i = 0; i < s.lq; ++i) {
      const int64_t r = g * s.lq + i;
      const float* qi = Q + r * s.d;
      const float* oi = O + r * s.d;
      const float* doi = DO + r * s.d;
      const float li = LSE[r];
      float di = 0.0f;
      for (int64_t d = 0; d < s.d; ++d) di += doi[d] * oi[d];
      std::fill(p, p + s.lk, 0.0f);
      std::fill(ds, ds + s.lk, 0.0f);
      for (int64_t d = 0; d < s.d; ++d) {
        const float c = qi[d] * scale;
        const float e = doi[d];
        const float* kd = kg + d * s.lk;
        const float* vd = vg + d * s.lk;
        for (int64_t j = 0; j < s.lk; ++j) {
          p[j] += c * kd[j];
          ds[j] += e * vd[j];
        }
      }
      for (int64_t j = 0; j < s.lk; ++j) {
        p[j] = ExpNonPositive(p[j] - li);
        ds[j] = p[j] * (ds[j] - di);
      }
      float* dqi = DQ + r * s.d;
      for (int64_t d = 0; d < s.d; ++d) {
        const float c = qi[d] * scale;
        const float e = doi[d];
        const float* kd = kg + d * s.lk;
        float* dkd = dkg + d * s.lk;
        float* dvd = dvg + d * s.lk;
        float acc = 0.0f;
        for (int64_t j = 0; j < s.lk; ++j) {
          acc += ds[j] * kd[j];
          dkd[j] += c * ds[j];
          dvd[j] += e * p[j];
        }
        dqi[d] = acc * scale;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
