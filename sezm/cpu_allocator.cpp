// A caching CPU allocator for torch: large requests are carved from 128 MB segments that are
// kept for the life of the process. Built and installed by sezm/cpu_allocator.py (see its
// docstring).
//
// Requests of 64 KB or more are rounded up to 512 bytes and served best-fit (the smallest free
// block that holds them, then the lowest address) from the free blocks of the segments; the part
// of a block that the request leaves (64 KB or more) stays free. A freed block merges with free
// neighbours of its segment, so a step's pattern of tensor sizes reuses the same memory instead of
// fragmenting the heap. A request larger than a segment gets a segment of its own size. Smaller
// requests go to c10's aligned malloc, as with torch's default allocator.
//
// A segment's pages are taken from the system when first written, and best fit fills the low
// addresses first, so the memory a run holds is what it has touched: for a DPA4-Mini step,
// replaying its requests, 1,061 MB touched with 128 MB segments, 1,104 MB with 32 MB ones, for
// a peak of 994 MB of live tensors.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace {

constexpr size_t kLarge = size_t{64} << 10;     // smaller requests: c10::alloc_cpu
constexpr size_t kRound = 512;                  // sizes of large blocks: multiples of this
constexpr size_t kSegment = size_t{128} << 20;  // address space taken from the system at a time

struct Block {
  char* segment;  // start of the segment the block lies in
  size_t size;
  bool free;
};

// The mutex and the containers live on the heap and are never destroyed: tensors that
// libtorch's own statics hold can be freed at exit after this library's statics are gone.
std::mutex& mutex = *new std::mutex;
auto& blocks = *new std::map<char*, Block>;                   // every large block, by address
auto& free_blocks = *new std::set<std::pair<size_t, char*>>;  // the free ones, by (size, address)
size_t reserved = 0, in_use = 0, peak_in_use = 0, segments = 0;

// Called with the mutex held: merges the free block at `it` with the next block when that is
// free and in the same segment.
void merge_with_next(std::map<char*, Block>::iterator it) {
  auto next = std::next(it);
  if (next == blocks.end() || !next->second.free || next->second.segment != it->second.segment)
    return;
  free_blocks.erase({next->second.size, next->first});
  it->second.size += next->second.size;
  blocks.erase(next);
}

void release(void* ptr) {
  char* p = static_cast<char*>(ptr);
  std::lock_guard<std::mutex> guard(mutex);
  auto it = blocks.find(p);
  if (it == blocks.end()) {  // a small block (raw_deallocate reaches here too)
    c10::free_cpu(ptr);
    return;
  }
  in_use -= it->second.size;
  it->second.free = true;
  merge_with_next(it);
  if (it != blocks.begin()) {
    auto prev = std::prev(it);
    if (prev->second.free && prev->second.segment == it->second.segment) {
      free_blocks.erase({prev->second.size, prev->first});
      merge_with_next(prev);
      it = prev;
    }
  }
  free_blocks.insert({it->second.size, it->first});
}

// Called with the mutex held: a free block of at least `size` bytes, taking a new segment when
// none is free.
std::set<std::pair<size_t, char*>>::iterator fitting_block(size_t size) {
  auto fit = free_blocks.lower_bound({size, nullptr});
  if (fit != free_blocks.end()) return fit;
  size_t bytes = std::max(size, kSegment);
  char* segment = static_cast<char*>(c10::alloc_cpu(bytes));  // throws when out of memory
  reserved += bytes;
  segments += 1;
  blocks[segment] = Block{segment, bytes, true};
  return free_blocks.insert({bytes, segment}).first;
}

struct CachingCPUAllocator final : at::Allocator {
  at::DataPtr allocate(size_t n) override {
    const at::Device cpu(at::DeviceType::CPU);
    if (n < kLarge) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, cpu};
    }
    size_t size = (n + kRound - 1) / kRound * kRound;
    std::lock_guard<std::mutex> guard(mutex);
    auto fit = fitting_block(size);
    char* p = fit->second;
    size_t have = fit->first;
    free_blocks.erase(fit);
    Block& block = blocks[p];
    if (have - size >= kLarge) {  // split: the rest of the block stays free
      blocks[p + size] = Block{block.segment, have - size, true};
      free_blocks.insert({have - size, p + size});
      block.size = size;
    }
    block.free = false;
    in_use += block.size;
    peak_in_use = std::max(peak_in_use, in_use);
    return {p, p, &release, cpu};
  }
  at::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CachingCPUAllocator allocator;

}  // namespace

extern "C" {

// Makes the allocator torch's CPU allocator from now on (tensors allocated before keep theirs).
// A fork holds the mutex across it, so that a child never starts with it locked by a thread it
// does not have.
void sezm_install_cpu_allocator() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { mutex.lock(); }, [] { mutex.unlock(); }, [] { mutex.unlock(); });
  });
  c10::SetCPUAllocator(&allocator, /*priority=*/255);
}

// Bytes reserved from the system, bytes in use, peak bytes in use, segments, free blocks.
void sezm_cpu_allocator_stats(int64_t out[5]) {
  std::lock_guard<std::mutex> guard(mutex);
  out[0] = static_cast<int64_t>(reserved);
  out[1] = static_cast<int64_t>(in_use);
  out[2] = static_cast<int64_t>(peak_in_use);
  out[3] = static_cast<int64_t>(segments);
  out[4] = static_cast<int64_t>(free_blocks.size());
}
}

// Loading the library installs it: in a program without Python that links libtorch (LAMMPS
// with DeePMD-kit's plugin), LD_PRELOAD=<this library> is all it takes. (Initialised after the
// state above: dynamic initialisation follows the order of definition within a file.)
namespace {
struct InstallOnLoad {
  InstallOnLoad() { sezm_install_cpu_allocator(); }
} install_on_load;
}  // namespace
