// Scratch arrays that keep their memory between calls. Why: a fresh allocation of a few MB is mapped anew by the
// allocator on every call, and its first touch costs a page fault per 4 KiB (zeroed by the kernel): at d = 784 the
// screened posterior's packed cloud (1 MB touched per call) spent longer in page faults than in arithmetic.
// Arrays up to kPoolMaxBytes go back to a small process-wide pool when released; larger ones are freed.
#pragma once
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

namespace fastdiff::cpu {

inline constexpr size_t kPoolMaxBytes = size_t(64) << 20;
inline constexpr size_t kPoolSlots = 64;                      // a call holds ~30 arrays (screens, tiles, threads)
inline constexpr size_t kPoolMaxTotal = size_t(256) << 20;    // what the pool keeps at most, all blocks together

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool pool;
    return pool;
  }
  // A block of at least `bytes` bytes (64-byte aligned, contents unspecified); size receives its capacity.
  std::byte* take(size_t bytes, size_t& size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)   // the smallest block that fits
        if (free_[i].size >= bytes && (best == free_.size() || free_[i].size < free_[best].size)) best = i;
      if (best < free_.size()) {
        Block b = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        kept_ -= b.size;
        size = b.size;
        return b.data;
      }
    }
    size = bytes;
    return static_cast<std::byte*>(::operator new(bytes, std::align_val_t(64)));
  }
  void give(std::byte* data, size_t size) {
    if (size <= kPoolMaxBytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kPoolSlots && kept_ + size <= kPoolMaxTotal) {
        free_.push_back({data, size});
        kept_ += size;
        return;
      }
    }
    ::operator delete(data, std::align_val_t(64));
  }

 private:
  struct Block {
    std::byte* data;
    size_t size;
  };
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t kept_ = 0;
};

// n values of a trivially copyable T from the pool (uninitialised).
template <typename T>
class PooledArray {
 public:
  PooledArray() = default;
  explicit PooledArray(size_t n) : data_(BufferPool::instance().take(n * sizeof(T) + 1, size_)) {}
  PooledArray(const PooledArray&) = delete;
  PooledArray& operator=(const PooledArray&) = delete;
  ~PooledArray() {
    if (data_) BufferPool::instance().give(data_, size_);
  }
  // n values in place of the current ones (given back first)
  void reset(size_t n) {
    if (data_) BufferPool::instance().give(data_, size_);
    data_ = BufferPool::instance().take(n * sizeof(T) + 1, size_);
  }
  T* get() const { return reinterpret_cast<T*>(data_); }
  T& operator[](size_t i) const { return get()[i]; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace fastdiff::cpu
