// Reuse of the large buffers the CPU stacks allocate on every call: the states
// a forward keeps for its backward, and a backward's weight gradient.
//
// PyTorch's CPU allocator hands large blocks back to the C library, which
// returns blocks of 32 MB and more (and, depending on the heap, smaller ones)
// to the kernel, so every training step page-faults its states and weight
// gradients in again: at (256, 784, 16) that is 15 ms of a 51 MB Verlet
// forward and 10 ms of every 39 MB weight gradient (benchmarks/wide_floor.py),
// as much as some stacks spend above their matrix products. Blocks of at least
// kMinBytes freed by their tensors come back here instead, and a later request
// of the same size takes one; the least recently freed are released once more
// than the cap is held. Like the CUDA caching allocator, it trades memory held
// for speed: STABLENETS_CPU_CACHE_MB sets the cap (default 512; 0 turns the
// cache off), and stablenets_ext.ops.cpu_cache_empty() releases every block.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>

namespace stablenets {
namespace cpu_detail {

class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;

  // The process's cache (one per loaded kernel library). Never destroyed:
  // tensors may still return blocks during static destruction.
  static BlockCache& get();

  c10::DataPtr allocate(size_t n) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() const { return cap_ > 0; }
  // {bytes held, cap in bytes, hits, misses, blocks held}
  std::vector<int64_t> stats();
  void release_all();

 private:
  BlockCache();
  static void free_block(void* ptr);
  void give_back(void* ptr);

  std::mutex mu_;
  size_t cap_ = 0, held_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::list<std::pair<size_t, void*>> free_;  // most recently freed first
  std::unordered_map<void*, size_t> live_;    // handed out: pointer -> bytes
};

// at::empty(shape, options) for a CPU tensor, from the cache when it has at least
// min_bytes (the conv stacks pass less: their per-call temporaries of a few
// hundred kB page-fault in again on every call otherwise).
at::Tensor empty_cached(at::IntArrayRef shape, const at::TensorOptions& options,
                        size_t min_bytes = BlockCache::kMinBytes);

}  // namespace cpu_detail
}  // namespace stablenets
