// One AdamW step of one parameter leaf, in place, for XLA:CPU as an XLA FFI custom call.
//
// Why: XLA:CPU fuses no sibling outputs, so the step's optimizer was four passes over every
// leaf (the first moment, the second, then the parameter reading both back), each reading
// the gradient or a moment again: 7 reads and 3 writes per element. Here each element is
// read once (p, g, mu, nu) and written once (p, mu, nu), in the arithmetic of optax's
// clip_by_global_norm + adamw chain (float32; contractions may fuse, so results agree with
// optax to rounding, not bitwise). With the outputs aliased to p, mu and nu, XLA updates
// the donated state in place.
//
//   p, g, mu, nu (same shape, float32), c (kCoefs float32: see the enum) -> p, mu, nu
// When c[kOk] == 0 (a non-finite step) the outputs are the inputs.
#include <cstdint>
#include <cstring>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxmed::ParallelFor;

// The coefficient vector, computed once per component and step by jaxmed.optim.
enum Coef {
  kScale,     // the global-norm clipping factor (1 when this leaf is not clipped)
  kOneMinusB1,
  kB1,
  kOneMinusB2,
  kB2,
  kBias1,     // 1 - b1^t
  kBias2,     // 1 - b2^t
  kEps,
  kDecay,     // weight decay
  kNegLr,     // minus the learning rate at this step
  kOk,        // 1 to update, 0 to leave everything as it was
  kCoefs,
};

// Below this many elements a leaf runs on the calling thread alone.
constexpr int64_t kChunk = 1 << 15;

void Step(const float* c, int64_t n, const float* p, const float* g, const float* mu,
          const float* nu, float* po, float* muo, float* nuo) {
  const float scale = c[kScale], a1 = c[kOneMinusB1], b1 = c[kB1], a2 = c[kOneMinusB2],
              b2 = c[kB2], bias1 = c[kBias1], bias2 = c[kBias2], eps = c[kEps],
              decay = c[kDecay], neg_lr = c[kNegLr];
  // Elementwise, index i read before it is written: safe when the outputs alias the inputs.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * scale;
    const float m = a1 * gi + b1 * mu[i];
    const float v = a2 * (gi * gi) + b2 * nu[i];
    const float u = (m / bias1) / (__builtin_sqrtf(v / bias2) + eps);
    const float pi = p[i];
    muo[i] = m;
    nuo[i] = v;
    po[i] = pi + (u + decay * pi) * neg_lr;
  }
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                     ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                     ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> po,
                     ffi::ResultBuffer<ffi::F32> muo, ffi::ResultBuffer<ffi::F32> nuo) {
  const int64_t n = p.element_count();
  if (g.element_count() != n || mu.element_count() != n || nu.element_count() != n) {
    return ffi::Error::InvalidArgument("jaxmed adamw: p, g, mu and nu must have one shape");
  }
  if (coef.element_count() != kCoefs) {
    return ffi::Error::InvalidArgument("jaxmed adamw: the coefficient vector must hold 11");
  }
  const float* c = coef.typed_data();
  const float *P = p.typed_data(), *G = g.typed_data(), *M = mu.typed_data(),
              *V = nu.typed_data();
  float *PO = po->typed_data(), *MO = muo->typed_data(), *VO = nuo->typed_data();
  if (c[kOk] == 0.0f) {  // keep the state; copy only where XLA did not alias the buffers
    if (PO != P) std::memcpy(PO, P, n * sizeof(float));
    if (MO != M) std::memcpy(MO, M, n * sizeof(float));
    if (VO != V) std::memcpy(VO, V, n * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) {
    Step(c, n, P, G, M, V, PO, MO, VO);
  } else {
    ParallelFor(pool, chunks, [&](int64_t t) {
      const int64_t i = t * kChunk, k = std::min(kChunk, n - i);
      Step(c, k, P + i, G + i, M + i, V + i, PO + i, MO + i, VO + i);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedAdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // nu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coefficients
                                  .Ret<ffi::Buffer<ffi::F32>>()  // p
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mu
                                  .Ret<ffi::Buffer<ffi::F32>>());  // nu
