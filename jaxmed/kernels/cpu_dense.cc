// The weight gradient of a dense layer, dw = x^T dy, for XLA:CPU as an XLA FFI custom call.
//
// Why: XLA:CPU sends dot(x, dy) contracting both operands' leading (token) axis to Eigen,
// after transposing dy into a (features, tokens) copy, at about half the speed of its
// other products, and in a UNet train step those transposes and products are a large
// share of the step. Here x is read in place (the micro-kernel broadcasts one element of
// A at a time, so a strided A costs nothing extra) and dy row by row.
//
//   x (M, K), dy (M, N) -> dw (K, N)    float32, N a multiple of the vector width
// Every element of dw is summed over the M rows in order, however the work is split.

#include <algorithm>
#include <cstdint>

#include "cpu_gemm.h"
#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxmed::Gemm;
using jaxmed::kLanes;
using jaxmed::kMR;
using jaxmed::kNV;
using jaxmed::ParallelFor;

ffi::Error WgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                     ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions();
  const auto gd = dy.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || xd[0] != gd[0]) {
    return ffi::Error::InvalidArgument("jaxmed dense: x must be (M, K) and dy (M, N)");
  }
  const int64_t m = xd[0], k = xd[1], n = gd[1];
  if (n % kLanes) {
    return ffi::Error::InvalidArgument("jaxmed dense: N must be a multiple of 16");
  }
  // Tasks: 48 rows (of K) x 128 columns (of N) of dw, each summed over all M rows.
  constexpr int64_t kRows = 8 * kMR, kCols = 4 * kNV * kLanes;
  const int64_t rows = (k + kRows - 1) / kRows, cols = (n + kCols - 1) / kCols;
  const float* X = x.typed_data();
  const float* DY = dy.typed_data();
  float* DW = dw->typed_data();
  ParallelFor(pool, rows * cols, [&](int64_t item) {
    const int64_t k0 = item / cols * kRows, n0 = item % cols * kCols;
    const int64_t nk = std::min(kRows, k - k0), nn = std::min(kCols, n - n0);
    // dw[k0:, n0:] (nk x nn) = x[:, k0:]^T (nk x m) dy[:, n0:] (m x nn)
    Gemm<false>(nk, nn, m, X + k0, 1, k, DY + n0, n, DW + k0 * n + n0, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedDenseWgrad, WgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
