// Run-once work shared by the threads of a parallel region without a collective step: the first thread to claim a
// flag does the work, the others wait for it (a few microseconds of spinning at most: the work is one tile).
#pragma once
#include <atomic>
#include <cstdint>
#include <thread>

namespace fastdiff::cpu {

// state: 0 not done, 1 in progress, 2 done. f runs exactly once over all callers; every caller returns after it.
template <typename F>
inline void once(std::atomic<uint8_t>& state, F&& f) {
  if (state.load(std::memory_order_acquire) == 2) return;
  uint8_t expected = 0;
  if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    f();
    state.store(2, std::memory_order_release);
    return;
  }
  while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
}

}  // namespace fastdiff::cpu
