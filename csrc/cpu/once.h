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

// once(states[t], f(t)) for a thread about to read item t of n: while another thread is doing t, it does the next
// items nobody has claimed instead of waiting (threads of a call start on the same tile, and waiting serialised the
// packing: at d = 3072 a sixth of the call).
template <typename F>
inline void once_helping(std::atomic<uint8_t>* states, int64_t t, int64_t n, F&& f) {
  if (states[t].load(std::memory_order_acquire) == 2) return;
  for (int64_t h = t + 1; h < n && states[t].load(std::memory_order_acquire) == 1; ++h)
    if (states[h].load(std::memory_order_relaxed) == 0) once(states[h], [&] { f(h); });
  once(states[t], [&] { f(t); });
}

}  // namespace fastdiff::cpu
