// Shared by jaxmed's XLA:CPU FFI kernels (cpu_attention.cc, cpu_conv.cc).
#ifndef JAXMED_CPU_PARALLEL_H_
#define JAXMED_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxmed {

namespace ffi = xla::ffi;

// Runs f(i) for i in [0, n) on the caller and the pool's threads. Work is pulled from a
// shared counter, so the caller never waits on a task that has not started (no deadlock
// when the pool is busy or has a single thread); late tasks find no work and exit.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [n](State* s, const F* fn) {
    for (int64_t i = s->next.fetch_add(1); i < n; i = s->next.fetch_add(1)) {
      (*fn)(i);
      if (s->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([state, run, fn = &f] { run(state.get(), fn); });
  }
  run(state.get(), &f);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace jaxmed

#endif  // JAXMED_CPU_PARALLEL_H_
