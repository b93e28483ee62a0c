// The CPU block cache (block_cache.h) and its two ops: cpu_cache_stats and
// cpu_cache_empty.
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace stablenets {
namespace cpu_detail {

namespace {

size_t cap_from_env() {
  const char* v = std::getenv("STABLENETS_CPU_CACHE_MB");
  if (!v || !*v) return size_t{512} << 20;
  const std::string s(v);
  TORCH_CHECK(s.find_first_not_of("0123456789") == std::string::npos && s.size() <= 9,
              "STABLENETS_CPU_CACHE_MB: expected a whole number of megabytes (0 turns the "
              "CPU block cache off), got '", s, "'");
  return static_cast<size_t>(std::stoll(s)) << 20;
}

}  // namespace

BlockCache::BlockCache() : cap_(cap_from_env()) {}

BlockCache& BlockCache::get() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

c10::DataPtr BlockCache::allocate(size_t n) {
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first == n) {
        ptr = it->second;
        held_ -= n;
        free_.erase(it);
        break;
      }
    }
    ptr ? ++hits_ : ++misses_;
  }
  if (!ptr) ptr = c10::alloc_cpu(n);
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_[ptr] = n;
  }
  return {ptr, ptr, &BlockCache::free_block, c10::Device(c10::DeviceType::CPU)};
}

void BlockCache::free_block(void* ptr) { get().give_back(ptr); }

void BlockCache::give_back(void* ptr) {
  std::vector<void*> release;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(ptr);
    const size_t n = it == live_.end() ? 0 : it->second;
    if (it != live_.end()) live_.erase(it);
    if (n == 0 || n > cap_) {
      release.push_back(ptr);
    } else {
      while (held_ + n > cap_ && !free_.empty()) {  // drop the least recently freed
        release.push_back(free_.back().second);
        held_ -= free_.back().first;
        free_.pop_back();
      }
      free_.emplace_front(n, ptr);
      held_ += n;
    }
  }
  for (void* p : release) c10::free_cpu(p);
}

std::vector<int64_t> BlockCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return {static_cast<int64_t>(held_), static_cast<int64_t>(cap_), hits_, misses_,
          static_cast<int64_t>(free_.size())};
}

void BlockCache::release_all() {
  std::list<std::pair<size_t, void*>> blocks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    blocks.swap(free_);
    held_ = 0;
  }
  for (auto& b : blocks) c10::free_cpu(b.second);
}

at::Tensor empty_cached(at::IntArrayRef shape, const at::TensorOptions& options,
                        size_t min_bytes) {
  BlockCache& cache = BlockCache::get();
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(shape)) * options.dtype().itemsize();
  if (!cache.enabled() || bytes < min_bytes || options.device().type() != c10::kCPU)
    return at::empty(shape, options);
  return at::detail::empty_generic(shape, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

namespace {

std::vector<int64_t> cpu_cache_stats() { return BlockCache::get().stats(); }
void cpu_cache_empty() { BlockCache::get().release_all(); }

// x in dtype, in a block of the cache (contiguous). The autocast kernels cast a
// step's large float32 parameters to bfloat16 this way and, in its backward,
// their gradients back: with x.to(dtype) both were fresh blocks the C library
// returns to the kernel, page-faulted in again every step (a float32 weight
// gradient of (16, 784, 784) is 39 MB: ~20 ms a bf16 training step at one thread,
// a quarter of it; stablenets_ext/autocast.py).
at::Tensor cpu_cast(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor out = empty_cached(x.sizes(), x.options().dtype(dtype));
  out.copy_(x);
  return out;
}

}  // namespace
}  // namespace cpu_detail
}  // namespace stablenets

// Defined here rather than in ops.cpp: they belong to the loaded CPU kernel
// library (one per process), and take no tensor to dispatch on.
TORCH_LIBRARY_FRAGMENT(stablenets, m) {
  m.def("cpu_cache_stats() -> int[]", &stablenets::cpu_detail::cpu_cache_stats);
  m.def("cpu_cache_empty() -> ()", &stablenets::cpu_detail::cpu_cache_empty);
  m.def("cpu_cast(Tensor x, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(stablenets, CPU, m) { m.impl("cpu_cast", &stablenets::cpu_detail::cpu_cast); }
