// The register-blocked float32 GEMM shared by jaxmed's XLA:CPU kernels (cpu_conv.cc,
// cpu_dense.cc): near the core's peak, and every element of C is summed over k in the order
// k = 0, 1, ... whatever the blocking, so results do not depend on how the work is split.
#ifndef JAXMED_CPU_GEMM_H_
#define JAXMED_CPU_GEMM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

namespace jaxmed {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Rows and column vectors of the micro-kernel's register block (6 x 2 vectors = 12
// accumulators, the usual choice for 16 or 32 vector registers).
constexpr int kMR = 6;
constexpr int kNV = 2;

// C[r, 0:NV*kLanes] (+)= sum_k A[r * lda + k * ak] * B[k * ldb + 0:NV*kLanes], r < MR.
template <int MR, int NV, bool kAccumulate>
void Micro(int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
           float* C, int64_t ldc) {
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = kAccumulate ? Load(C + r * ldc + v * kLanes) : Vec{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Load(B + k * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Vec a = Vec{} + A[r * lda + k * ak];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) Store(C + r * ldc + v * kLanes, acc[r][v]);
  }
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t);

struct MicroTable {
  MicroFn f[kMR][kNV];
};

template <bool kAccumulate, int... R>
constexpr MicroTable MakeTable(std::integer_sequence<int, R...>) {
  MicroTable t{};
  ((t.f[R][0] = &Micro<R + 1, 1, kAccumulate>, t.f[R][1] = &Micro<R + 1, 2, kAccumulate>), ...);
  return t;
}

// C (M x N) (+)= A (M x K) B (K x N); A's element (m, k) is A[m * lda + k * ak], B and C
// are row-major with leading dimensions ldb and ldc. N must be a multiple of kLanes.
// K runs in blocks of kKC so that a B panel (kKC x 32) stays in L1; later blocks continue
// the sums in C, so every element is still summed in the order k = 0, 1, ...
template <bool kAccumulate>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, int64_t ak,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  static constexpr MicroTable set = MakeTable<kAccumulate>(std::make_integer_sequence<int, kMR>{});
  static constexpr MicroTable add = MakeTable<true>(std::make_integer_sequence<int, kMR>{});
  constexpr int64_t kKC = 256;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const MicroTable& table = k0 == 0 ? set : add;
    for (int64_t n0 = 0; n0 < N; n0 += kNV * kLanes) {
      const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / kLanes));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        table.f[mr - 1][nv - 1](kc, A + m0 * lda + k0 * ak, lda, ak, B + k0 * ldb + n0, ldb,
                                C + m0 * ldc + n0, ldc);
      }
    }
  }
}

}  // namespace jaxmed

#endif  // JAXMED_CPU_GEMM_H_
