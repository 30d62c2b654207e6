// 3x3, stride 1, SAME-padded convolutions for XLA:CPU as XLA FFI custom calls, by Winograd
// F(2x2, 3x3) (Lavin & Gray 2016): 16 multiplies per 2x2 output tile and channel pair
// instead of 36, the rest as additions that run at memory speed.
//
// Why: XLA:CPU's convolutions reach about half of what oneDNN (PyTorch) reaches on the
// SD UNet's 16x16 and 32x32 feature maps, and they dominate the CPU train step there.
//
// Each 2x2 output tile reads a 4x4 input patch. With V = B^T d B (input patch), U = G g G^T
// (filter) and M = sum over input channels of V * U (elementwise over the 16 positions),
// the output tile is A^T M A. The channel sums are 16 matrix products, one per position.
// Four kernels (the filter transforms are here too: as jnp einsums XLA:CPU took longer
// over them than over the convolution):
//   WinogradFilter:     w (3,3,Ci,Co)               -> u (16,Ci,Co), or with flip=true the
//                       transform of the flipped, transposed filter, (16,Co,Ci)
//   WinogradConv:       x (N,H,W,Ci), u (16,Ci,Co)  -> y (N,H,W,Co) and a work buffer
//   WinogradConvFilter: x (N,H,W,Ci), w (3,3,Ci,Co) -> y and a work buffer: the two above in
//                       one call, the filter transformed panel by panel (flip as above)
//   WinogradWgrad:      x (N,H,W,Ci), dy (N,H,W,Co) -> dw (3,3,Ci,Co) and two work buffers
// The input gradient is the conv of dy with the flipped filter's transform.
//
// The 16 products of every schedule run through one register-blocked micro-kernel (near
// the core's peak). Every output element is accumulated
// over input channels in the same order whatever the schedule, block, batch size or
// thread count, so an image's result does not depend on how a batch is split.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

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

// Per-thread scratch, kept between calls: a fresh multi-hundred-KB buffer per block would
// be mmapped and page-faulted every time.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

struct Shape {
  int64_t n, h, w, ci, co;
  int64_t th, tw;  // tiles per column and row
  int64_t tiles() const { return n * th * tw; }
  // Tiles are numbered example by example, row by row: tile -> (example, tile row, column).
  std::tuple<int64_t, int64_t, int64_t> Tile(int64_t tile) const {
    return {tile / (th * tw), tile / tw % th, tile % tw};
  }
};

// Tiles per task of the staged schedules' transform passes.
constexpr int64_t kTransformTiles = 32;

// V[p * stride + t * Ci + c] = (B^T d B)[p] for the 4x4 patch of tile `tile` (pixels outside
// the image read as 0), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
void InputTransform(const Shape& s, const float* x, int64_t tile, const float* zeros, float* V,
                    int64_t stride) {
  const auto [n, ty, tx] = s.Tile(tile);
  const float* d[4][4];
  for (int r = 0; r < 4; ++r) {
    const int64_t y = 2 * ty + r - 1;
    for (int c = 0; c < 4; ++c) {
      const int64_t xx = 2 * tx + c - 1;
      d[r][c] = (y >= 0 && y < s.h && xx >= 0 && xx < s.w)
                    ? x + ((n * s.h + y) * s.w + xx) * s.ci
                    : zeros;
    }
  }
#pragma GCC ivdep  // outputs never alias inputs
  for (int64_t c = 0; c < s.ci; ++c) {
    float t[4][4];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = d[0][j][c] - d[2][j][c];
      t[1][j] = d[1][j][c] + d[2][j][c];
      t[2][j] = d[2][j][c] - d[1][j][c];
      t[3][j] = d[1][j][c] - d[3][j][c];
    }
    for (int i = 0; i < 4; ++i) {
      V[(4 * i + 0) * stride + c] = t[i][0] - t[i][2];
      V[(4 * i + 1) * stride + c] = t[i][1] + t[i][2];
      V[(4 * i + 2) * stride + c] = t[i][2] - t[i][1];
      V[(4 * i + 3) * stride + c] = t[i][1] - t[i][3];
    }
  }
}

// Output tile = A^T m A, A^T = [1 1 1 0; 0 1 -1 -1]; pixels outside the image go to `sink`.
void OutputTransform(const Shape& s, const float* M, int64_t stride, int64_t tile, float* y,
                     float* sink) {
  const auto [n, ty, tx] = s.Tile(tile);
  float* o[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t yy = 2 * ty + i, xx = 2 * tx + j;
      o[i][j] = (yy < s.h && xx < s.w) ? y + ((n * s.h + yy) * s.w + xx) * s.co : sink;
    }
  }
#pragma GCC ivdep  // outputs never alias inputs
  for (int64_t c = 0; c < s.co; ++c) {
    float m[4][4], t[2][4];
    for (int p = 0; p < 16; ++p) m[p / 4][p % 4] = M[p * stride + c];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = m[0][j] + m[1][j] + m[2][j];
      t[1][j] = m[1][j] - m[2][j] - m[3][j];
    }
    for (int i = 0; i < 2; ++i) {
      o[i][0][c] = t[i][0] + t[i][1] + t[i][2];
      o[i][1][c] = t[i][1] - t[i][2] - t[i][3];
    }
  }
}

// Z[p * stride + t * Co + c] = (A e A^T)[p] for the 2x2 output-gradient tile e,
// A = [1 0; 1 1; 1 -1; 0 -1] (pixels outside the image read as 0).
void GradTransform(const Shape& s, const float* dy, int64_t tile, const float* zeros, float* Z,
                   int64_t stride) {
  const auto [n, ty, tx] = s.Tile(tile);
  const float* e[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t yy = 2 * ty + i, xx = 2 * tx + j;
      e[i][j] = (yy < s.h && xx < s.w) ? dy + ((n * s.h + yy) * s.w + xx) * s.co : zeros;
    }
  }
#pragma GCC ivdep  // outputs never alias inputs
  for (int64_t c = 0; c < s.co; ++c) {
    float t[4][2];
    for (int j = 0; j < 2; ++j) {
      t[0][j] = e[0][j][c];
      t[1][j] = e[0][j][c] + e[1][j][c];
      t[2][j] = e[0][j][c] - e[1][j][c];
      t[3][j] = -e[1][j][c];
    }
    for (int i = 0; i < 4; ++i) {
      Z[(4 * i + 0) * stride + c] = t[i][0];
      Z[(4 * i + 1) * stride + c] = t[i][0] + t[i][1];
      Z[(4 * i + 2) * stride + c] = t[i][0] - t[i][1];
      Z[(4 * i + 3) * stride + c] = -t[i][1];
    }
  }
}

// The staged schedules' first and last passes: every tile's input transform into V
// (16, tiles, Ci), and every tile's output transform from M (16, tiles, Co) into y.
void TransformInputs(ffi::ThreadPool& pool, const Shape& s, const float* x, float* V) {
  const int64_t nt = s.tiles();
  ParallelFor(pool, (nt + kTransformTiles - 1) / kTransformTiles, [&](int64_t b) {
    float* zeros = Scratch(s.ci);
    std::fill(zeros, zeros + s.ci, 0.0f);
    for (int64_t t = b * kTransformTiles; t < std::min(nt, (b + 1) * kTransformTiles); ++t) {
      InputTransform(s, x, t, zeros, V + t * s.ci, nt * s.ci);
    }
  });
}

void TransformOutputs(ffi::ThreadPool& pool, const Shape& s, const float* M, float* y) {
  const int64_t nt = s.tiles();
  ParallelFor(pool, (nt + kTransformTiles - 1) / kTransformTiles, [&](int64_t b) {
    float* sink = Scratch(s.co);
    for (int64_t t = b * kTransformTiles; t < std::min(nt, (b + 1) * kTransformTiles); ++t) {
      OutputTransform(s, M + t * s.co, nt * s.co, t, y, sink);
    }
  });
}

// Tiles per block: the block's transformed input and products (16 x T x (Ci + Co) floats)
// in about 512 KB of L2, T a multiple of the micro-kernel's rows.
int64_t BlockTiles(int64_t channels) {
  const int64_t t = (512 << 10) / (16 * sizeof(float) * std::max<int64_t>(channels, 1));
  return std::clamp<int64_t>(t / kMR * kMR, kMR, 16 * kMR);
}

// u[p * sp + o] = (G g_o G^T)[p] for the 3x3 filters g_o (o < co; tap (k, l) of g_o at
// g[k][l][o]), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]. Unit stride along o: it vectorises.
void FilterRows(const float* const g[3][3], int64_t co, float* u, int64_t sp) {
#pragma GCC ivdep  // outputs never alias inputs
  for (int64_t o = 0; o < co; ++o) {
    float t[4][3];
    for (int l = 0; l < 3; ++l) {
      t[0][l] = g[0][l][o];
      t[1][l] = 0.5f * (g[0][l][o] + g[1][l][o] + g[2][l][o]);
      t[2][l] = 0.5f * (g[0][l][o] - g[1][l][o] + g[2][l][o]);
      t[3][l] = g[2][l][o];
    }
    for (int a = 0; a < 4; ++a) {
      u[(4 * a + 0) * sp + o] = t[a][0];
      u[(4 * a + 1) * sp + o] = 0.5f * (t[a][0] + t[a][1] + t[a][2]);
      u[(4 * a + 2) * sp + o] = 0.5f * (t[a][0] - t[a][1] + t[a][2]);
      u[(4 * a + 3) * sp + o] = t[a][2];
    }
  }
}

// u = the filter transform of w (3, 3, Ci, Co) as (16, Ci, Co). flip: of the flipped,
// transposed filter (g[k][l] = w[2-k][2-l], the input gradient's), as (16, Co, Ci). Each
// block of 16 input channels is transformed into a padded buffer, then copied out
// (transposed 16 x 16 at a time for flip): writing the 16 planes of u directly, at a
// power-of-two distance from each other, thrashed the cache. One thread: the
// blocks take microseconds, and handing them to the pool, whose other thread is usually
// running a concurrent op in a train step, doubled the filters' share of the step.
ffi::Error FilterImpl(ffi::ThreadPool, ffi::Buffer<ffi::F32> w, bool flip,
                      ffi::ResultBuffer<ffi::F32> u) {
  const auto wd = w.dimensions();
  if (wd.size() != 4 || wd[0] != 3 || wd[1] != 3) {
    return ffi::Error::InvalidArgument("jaxmed conv: w must be (3, 3, Ci, Co)");
  }
  constexpr int64_t kc = 16;  // input channels per block
  const int64_t ci = wd[2], co = wd[3];
  const int64_t ld = co + 16;  // buffer row stride: not a power of two, no cache-set conflicts
  const float* W = w.typed_data();
  float* U = u->typed_data();
  float* tmp = Scratch(16 * kc * ld);  // [p][i][o]
  for (int64_t i0 = 0; i0 < ci; i0 += kc) {
    const int64_t ni = std::min(kc, ci - i0);
    for (int64_t i = i0; i < i0 + ni; ++i) {
      const float* g[3][3];
      for (int k = 0; k < 3; ++k) {
        for (int l = 0; l < 3; ++l) {
          g[k][l] = W + ((flip ? (2 - k) * 3 + (2 - l) : k * 3 + l) * ci + i) * co;
        }
      }
      FilterRows(g, co, tmp + (i - i0) * ld, kc * ld);
    }
    for (int p = 0; p < 16; ++p) {
      const float* src = tmp + p * kc * ld;
      if (!flip) {
        for (int64_t il = 0; il < ni; ++il) {
          std::memcpy(U + (p * ci + i0 + il) * co, src + il * ld, co * sizeof(float));
        }
        continue;
      }
      for (int64_t o0 = 0; o0 < co; o0 += kc) {
        float block[kc][kc];  // [o][i]
        const int64_t no = std::min(kc, co - o0);
        for (int64_t il = 0; il < ni; ++il) {
          for (int64_t oo = 0; oo < no; ++oo) block[oo][il] = src[il * ld + o0 + oo];
        }
        for (int64_t oo = 0; oo < no; ++oo) {
          std::memcpy(U + (p * co + o0 + oo) * ci + i0, block[oo], ni * sizeof(float));
        }
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error CheckShape(const ffi::AnyBuffer::Dimensions& x, int64_t co, Shape* s) {
  if (x.size() != 4) return ffi::Error::InvalidArgument("jaxmed conv: x must be (N, H, W, C)");
  if (co % kLanes) {
    return ffi::Error::InvalidArgument("jaxmed conv: output channels must be a multiple of 16");
  }
  *s = Shape{x[0], x[1], x[2], x[3], co, (x[1] + 1) / 2, (x[2] + 1) / 2};
  return ffi::Error::Success();
}

// Two schedules with the same arithmetic (bitwise equal results):
// - fused (empty `work`): each task transforms a block of tiles, multiplies and transforms
//   back while the block is in L2; every block reads all 16 transformed filters, which is
//   cheap for narrow layers;
// - staged (`work` is (16, tiles, Ci + Co)): all tiles are transformed first, then each
//   (position, block of tiles) product is one task that reads its filter once, then the
//   output transform; for wide layers, whose 16 filters would not stay in cache.
ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> work) {
  const auto ud = u.dimensions();
  if (ud.size() != 3 || ud[0] != 16 || ud[1] != x.dimensions().back()) {
    return ffi::Error::InvalidArgument("jaxmed conv: u must be (16, Ci, Co)");
  }
  Shape s;
  if (auto err = CheckShape(x.dimensions(), ud[2], &s); err.failure()) return err;
  const float* X = x.typed_data();
  const float* U = u.typed_data();
  float* Y = y->typed_data();
  const int64_t nt = s.tiles();
  if (work->element_count() == 0) {
    const int64_t T = BlockTiles(s.ci + s.co);
    ParallelFor(pool, (nt + T - 1) / T, [&](int64_t b) {
      const int64_t t0 = b * T, n = std::min(T, nt - t0);
      float* V = Scratch(16 * T * (s.ci + s.co) + s.ci + s.co);
      float* M = V + 16 * T * s.ci;
      float* zeros = M + 16 * T * s.co;
      float* sink = zeros + s.ci;
      std::fill(zeros, zeros + s.ci, 0.0f);
      for (int64_t t = 0; t < n; ++t) InputTransform(s, X, t0 + t, zeros, V + t * s.ci, T * s.ci);
      for (int p = 0; p < 16; ++p) {
        Gemm<false>(n, s.co, s.ci, V + p * T * s.ci, s.ci, 1, U + p * s.ci * s.co, s.co,
                    M + p * T * s.co, s.co);
      }
      for (int64_t t = 0; t < n; ++t) OutputTransform(s, M + t * s.co, T * s.co, t0 + t, Y, sink);
    });
    return ffi::Error::Success();
  }
  if (work->element_count() != 16 * nt * (s.ci + s.co)) {
    return ffi::Error::InvalidArgument("jaxmed conv: work must be empty or (16, tiles, Ci + Co)");
  }
  float* V = work->typed_data();
  float* M = V + 16 * nt * s.ci;
  TransformInputs(pool, s, X, V);
  constexpr int64_t kRows = 16 * kMR;  // tiles per product task
  const int64_t blocks = (nt + kRows - 1) / kRows;
  ParallelFor(pool, 16 * blocks, [&](int64_t item) {
    const int64_t p = item / blocks, t0 = item % blocks * kRows, n = std::min(kRows, nt - t0);
    Gemm<false>(n, s.co, s.ci, V + (p * nt + t0) * s.ci, s.ci, 1, U + p * s.ci * s.co, s.co,
                M + (p * nt + t0) * s.co, s.co);
  });
  TransformOutputs(pool, s, M, Y);
  return ffi::Error::Success();
}

// The staged schedule with the filter transformed inside the product pass, from w itself:
// each task transforms the filter for one panel of output channels (16 x Ci x 32 floats, in
// L2) and multiplies every tile by it. For small maps (8x8, 16x16) with wide filters, where
// a separate filter transform writes 16/9 of w to memory for the conv to read back (in a
// train step, where w and u are cold, at several times its cost alone). flip: the input
// gradient's conv (x is dy with Co channels; the transform of the flipped, transposed filter).
ffi::Error ConvFilterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          bool flip, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> work) {
  const auto wd = w.dimensions();
  if (wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[flip ? 3 : 2] != x.dimensions().back()) {
    return ffi::Error::InvalidArgument("jaxmed conv: w must be (3, 3, Ci, Co) with x's Ci");
  }
  Shape s;
  if (auto err = CheckShape(x.dimensions(), wd[flip ? 2 : 3], &s); err.failure()) return err;
  if (s.ci % kLanes) {
    return ffi::Error::InvalidArgument("jaxmed conv: input channels must be a multiple of 16");
  }
  const int64_t nt = s.tiles();
  if (work->element_count() != 16 * nt * (s.ci + s.co)) {
    return ffi::Error::InvalidArgument("jaxmed conv: work must be (16, tiles, Ci + Co)");
  }
  const float* X = x.typed_data();
  const float* W = w.typed_data();
  float* Y = y->typed_data();
  float* V = work->typed_data();
  float* M = V + 16 * nt * s.ci;
  TransformInputs(pool, s, X, V);
  constexpr int64_t kPanel = kNV * kLanes;  // output channels per task
  const int64_t wco = wd[3];                // w's row length
  ParallelFor(pool, (s.co + kPanel - 1) / kPanel, [&](int64_t b) {
    const int64_t o0 = b * kPanel, no = std::min(kPanel, s.co - o0);
    // panel[p][i][o - o0]: the filters into outputs o0..o0 + no from every input i.
    float* panel = Scratch(2 * 16 * s.ci * kPanel);
    float* tmp = panel + 16 * s.ci * kPanel;
    const float* g[3][3];
    if (!flip) {
      for (int64_t i = 0; i < s.ci; ++i) {
        for (int k = 0; k < 3; ++k) {
          for (int l = 0; l < 3; ++l) g[k][l] = W + ((k * 3 + l) * s.ci + i) * wco + o0;
        }
        FilterRows(g, no, panel + i * kPanel, s.ci * kPanel);
      }
    } else {
      // Flipped taps of w's inputs o0..o0 + no (this conv's outputs), vectorised along w's
      // outputs (this conv's inputs) into tmp[p][o][i], then transposed into the panel.
      for (int64_t o = 0; o < no; ++o) {
        for (int k = 0; k < 3; ++k) {
          for (int l = 0; l < 3; ++l) {
            g[k][l] = W + (((2 - k) * 3 + (2 - l)) * s.co + o0 + o) * wco;
          }
        }
        FilterRows(g, s.ci, tmp + o * s.ci, kPanel * s.ci);
      }
      for (int p = 0; p < 16; ++p) {
        const float* src = tmp + p * kPanel * s.ci;
        float* dst = panel + p * s.ci * kPanel;
        for (int64_t i = 0; i < s.ci; ++i) {
          for (int64_t o = 0; o < no; ++o) dst[i * kPanel + o] = src[o * s.ci + i];
        }
      }
    }
    for (int p = 0; p < 16; ++p) {
      Gemm<false>(nt, no, s.ci, V + p * nt * s.ci, s.ci, 1, panel + p * s.ci * kPanel, kPanel,
                  M + p * nt * s.co + o0, s.co);
    }
  });
  TransformOutputs(pool, s, M, Y);
  return ffi::Error::Success();
}

// The weight gradient sums over every tile: dw = G^T (sum over tiles of V^T Z) G, with V the
// input transform and Z = A dy A^T. First every tile's V and Z are written to `vz` (an
// XLA-allocated temporary: no page faults per call); then the tiles are split into a fixed
// number of chunks (chosen by the caller from the shape only, so results are reproducible
// on any thread count) and each (chunk, position) product is one task, which keeps every
// core busy even on an 8x8 map; the chunks' sums are added in order and transformed.
ffi::Error WgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                     ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> partials,
                     ffi::ResultBuffer<ffi::F32> vz) {
  const auto gd = dy.dimensions();
  const auto xd = x.dimensions();
  if (gd.size() != 4 || gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2]) {
    return ffi::Error::InvalidArgument("jaxmed conv: dy must be (N, H, W, Co) like x");
  }
  Shape s;
  if (auto err = CheckShape(xd, gd[3], &s); err.failure()) return err;
  const int64_t nt = s.tiles();
  const int64_t size = 16 * s.ci * s.co;
  const int64_t chunks = partials->dimensions()[0];
  if (partials->element_count() != chunks * size || chunks < 1 ||
      vz->element_count() != 16 * nt * (s.ci + s.co)) {
    return ffi::Error::InvalidArgument(
        "jaxmed conv: work buffers must be (chunks, 16, Ci, Co) and (16, tiles, Ci + Co)");
  }
  const float* X = x.typed_data();
  const float* DY = dy.typed_data();
  float* partial = partials->typed_data();
  float* V = vz->typed_data();
  float* Z = V + 16 * nt * s.ci;
  ParallelFor(pool, (nt + kTransformTiles - 1) / kTransformTiles, [&](int64_t b) {
    float* zeros = Scratch(std::max(s.ci, s.co));
    std::fill(zeros, zeros + std::max(s.ci, s.co), 0.0f);
    for (int64_t t = b * kTransformTiles; t < std::min(nt, (b + 1) * kTransformTiles); ++t) {
      InputTransform(s, X, t, zeros, V + t * s.ci, nt * s.ci);
      GradTransform(s, DY, t, zeros, Z + t * s.co, nt * s.co);
    }
  });
  const int64_t per = (nt + chunks - 1) / chunks;
  ParallelFor(pool, chunks * 16, [&](int64_t item) {
    const int64_t c = item / 16, p = item % 16;
    const int64_t t0 = c * per, n = std::max<int64_t>(0, std::min(nt, t0 + per) - t0);
    float* acc = partial + item * s.ci * s.co;
    if (n == 0) {
      std::fill(acc, acc + s.ci * s.co, 0.0f);
      return;
    }
    // acc (Ci x Co) = V[p, tiles]^T (Ci x n) Z[p, tiles] (n x Co)
    Gemm<false>(s.ci, s.co, n, V + (p * nt + t0) * s.ci, 1, s.ci, Z + (p * nt + t0) * s.co,
                s.co, acc, s.co);
  });
  // dw = G^T m G (m summed over the chunks in order), G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1],
  // kJ (ci, co) pairs at a time so that every loop runs over them with unit stride.
  constexpr int64_t kJ = 64;
  const int64_t plane = s.ci * s.co;
  float* DW = dw->typed_data();
  ParallelFor(pool, (plane + kJ - 1) / kJ, [&](int64_t i) {
    const int64_t j0 = i * kJ, nj = std::min(kJ, plane - j0);
    float m[4][4][kJ], r[3][4][kJ];
    for (int p = 0; p < 16; ++p) {
      float* mp = m[p / 4][p % 4];
      const float* src = partial + p * plane + j0;
      for (int64_t j = 0; j < nj; ++j) mp[j] = src[j];
      for (int64_t c = 1; c < chunks; ++c) {
        for (int64_t j = 0; j < nj; ++j) mp[j] += src[c * size + j];
      }
    }
    for (int b = 0; b < 4; ++b) {
      for (int64_t j = 0; j < nj; ++j) {
        r[0][b][j] = m[0][b][j] + 0.5f * (m[1][b][j] + m[2][b][j]);
        r[1][b][j] = 0.5f * (m[1][b][j] - m[2][b][j]);
        r[2][b][j] = 0.5f * (m[1][b][j] + m[2][b][j]) + m[3][b][j];
      }
    }
    for (int k = 0; k < 3; ++k) {
      float* out = DW + k * 3 * plane + j0;
#pragma GCC ivdep  // outputs never alias inputs
      for (int64_t j = 0; j < nj; ++j) {
        out[j] = r[k][0][j] + 0.5f * (r[k][1][j] + r[k][2][j]);
        out[plane + j] = 0.5f * (r[k][1][j] - r[k][2][j]);
        out[2 * plane + j] = 0.5f * (r[k][1][j] + r[k][2][j]) + r[k][3][j];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedWinogradConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedWinogradWgrad, WgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedWinogradConvFilter, ConvFilterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmedWinogradFilter, FilterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip")
                                  .Ret<ffi::Buffer<ffi::F32>>());
