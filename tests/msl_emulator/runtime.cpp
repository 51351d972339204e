// Fiber runtime for the MSL emulator: runs a grid of threadgroups on the CPU, one fiber per GPU
// thread, SIMD groups of 32, switching at every barrier and SIMD collective. Threadgroup memory is
// NaN-poisoned (0xFF bytes); barrier divergence and divergent collectives are reported with the
// kernel line. Built once (a shared library, or an object for the AddressSanitizer driver); each
// kernel is a separate small build whose `emu_entry` the dispatcher calls per GPU thread.
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifdef EMU_THREADS
#include <condition_variable>
#include <mutex>
#include <thread>
#endif

#include "shim.h"  // last: it defines the MSL address-space words (`thread`, ...) away
#undef thread      // the runtime itself is plain C++

#if !defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_UCONTEXT
#endif
#ifdef EMU_UCONTEXT
#include <ucontext.h>
#else
extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");
#endif

namespace emu {

using EntryFn = void (*)(void**, const Builtins*);

enum State { READY, AT_BARRIER, AT_SIMD, AT_SIMD_BARRIER, DONE };

constexpr size_t kStack = 256 * 1024;

struct Fiber {
  Builtins b;
  State state = READY;
  int line = 0;
  uint32_t seq = 0;  // collectives passed (selects the exchange buffer parity)
  uint64_t mat_hash = 0;  // simdgroup_matrix operations so far: their lines and arguments
  uint32_t mat_ops = 0;
  int mat_first = 0, mat_last = 0;  // lines of the first and latest one
  char* stack = nullptr;
#ifdef EMU_UCONTEXT
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
};

struct Simd {
  alignas(16) unsigned char slots[2][32][32];
  uint32_t active[2];
};

struct Run {
  void** bufs = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Simd> simds;
  std::vector<void*> tg_slots;
  Fiber* current = nullptr;
#ifdef EMU_UCONTEXT
  ucontext_t sched;
#else
  void* sched_sp = nullptr;
#endif
  std::string error;
};

Run* g_run = nullptr;
EntryFn g_entry = nullptr;

inline void yield_to_scheduler() {
  Fiber* f = g_run->current;
#ifdef EMU_UCONTEXT
  swapcontext(&f->ctx, &g_run->sched);
#else
  emu_switch(&f->sp, g_run->sched_sp);
#endif
}

#ifdef EMU_THREADS
// Thread mode (for ThreadSanitizer): one OS thread per GPU thread. Barriers and collectives are
// mutex/condition-variable rendezvous (so TSan sees their happens-before edges); a thread that
// returned no longer takes part. No schedules and no divergence reports in this mode.
struct Rendezvous {
  std::mutex m;
  std::condition_variable cv;
  uint32_t alive = 0, arrived = 0, arrived_mask = 0;
  uint64_t generation = 0;
};
struct ThreadGroup {
  Rendezvous group;
  std::vector<Rendezvous> simd;
  std::mutex alloc;
};
ThreadGroup* g_tg = nullptr;
thread_local Fiber* t_self = nullptr;

// Called with r.m held: open the rendezvous once every live participant arrived.
inline void release_if_complete(Rendezvous& r, Simd* simd, uint32_t parity) {
  if (r.arrived == 0 || r.arrived < r.alive) return;
  if (simd) {
    simd->active[parity] = r.arrived_mask;
    for (uint32_t lane = 0; lane < 32; ++lane)
      if (!(r.arrived_mask >> lane & 1u)) std::memset(simd->slots[parity][lane], 0xFF, 32);
  }
  r.arrived = 0;
  r.arrived_mask = 0;
  ++r.generation;
  r.cv.notify_all();
}

inline void rendezvous(Rendezvous& r, uint32_t lane, Simd* simd, uint32_t parity) {
  std::unique_lock<std::mutex> lock(r.m);
  uint64_t generation = r.generation;
  ++r.arrived;
  r.arrived_mask |= 1u << lane;
  release_if_complete(r, simd, parity);
  r.cv.wait(lock, [&] { return r.generation != generation; });
}

void barrier(int, bool simd_only) {
  Fiber* f = t_self;
  if (simd_only)
    rendezvous(g_tg->simd[f->b.simdgroup_index_in_threadgroup], f->b.thread_index_in_simdgroup,
               nullptr, 0);
  else
    rendezvous(g_tg->group, 0, nullptr, 0);
}

void simd_exchange(const void* value, int size, int, unsigned char (**all)[32][32],
                   uint32_t* active, uint32_t* lane) {
  Fiber* f = t_self;
  uint32_t sg = f->b.simdgroup_index_in_threadgroup, ln = f->b.thread_index_in_simdgroup;
  Simd& s = g_run->simds[sg];
  uint32_t parity = f->seq & 1u;
  std::memcpy(s.slots[parity][ln], value, size);
  rendezvous(g_tg->simd[sg], ln, &s, parity);
  *all = &s.slots[parity];
  *active = s.active[parity];
  *lane = ln;
  f->seq++;
}

inline void leave(Rendezvous& r, Simd* simd, uint32_t parity) {
  std::lock_guard<std::mutex> lock(r.m);
  --r.alive;
  release_if_complete(r, simd, parity);
}

inline bool run_group_threads() {
  auto& fs = g_run->fibers;
  ThreadGroup tg;
  tg.simd = std::vector<Rendezvous>(g_run->simds.size());
  tg.group.alive = uint32_t(fs.size());
  for (size_t i = 0; i < fs.size(); ++i) tg.simd[i / 32].alive++;
  g_tg = &tg;
  std::vector<std::thread> threads;
  threads.reserve(fs.size());
  for (Fiber& f : fs)
    threads.emplace_back([&f] {
      t_self = &f;
      g_entry(g_run->bufs, &f.b);
      uint32_t sg = f.b.simdgroup_index_in_threadgroup;
      leave(g_tg->simd[sg], &g_run->simds[sg], f.seq & 1u);
      leave(g_tg->group, nullptr, 0);
    });
  for (auto& t : threads) t.join();
  g_tg = nullptr;
  return g_run->error.empty();
}
#else
void barrier(int line, bool simd_only) {
  Fiber* f = g_run->current;
  f->state = simd_only ? AT_SIMD_BARRIER : AT_BARRIER;
  f->line = line;
  yield_to_scheduler();
}

void simd_exchange(const void* value, int size, int line, unsigned char (**all)[32][32],
                   uint32_t* active, uint32_t* lane) {
  Fiber* f = g_run->current;
  uint32_t sg = f->b.simdgroup_index_in_threadgroup, ln = f->b.thread_index_in_simdgroup;
  Simd& s = g_run->simds[sg];
  uint32_t parity = f->seq & 1u;
  std::memcpy(s.slots[parity][ln], value, size);
  f->state = AT_SIMD;
  f->line = line;
  yield_to_scheduler();
  *all = &s.slots[parity];
  *active = s.active[parity];
  *lane = ln;
  f->seq++;
}
#endif

// simdgroup_matrix loads, stores and multiplies are noted per lane (no switch point: each lane
// moves its own elements); the scheduler compares the lanes of a SIMD group whenever they meet.
void mat_note(int line, const void* data, int size) {
#ifdef EMU_THREADS
  Fiber* f = t_self;
#else
  Fiber* f = g_run->current;
#endif
  uint64_t h = f->mat_hash ^ (uint64_t(uint32_t(line)) * 0x9E3779B97F4A7C15ull);
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (int i = 0; i < size; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  f->mat_hash = h;
  if (!f->mat_ops++) f->mat_first = line;
  f->mat_last = line;
}

uint lane_index() {
#ifdef EMU_THREADS
  return t_self->b.thread_index_in_simdgroup;
#else
  return g_run->current->b.thread_index_in_simdgroup;
#endif
}

// Threadgroup memory: one allocation per declaration per threadgroup, filled with NaN poison.
void* tg_alloc(int slot, size_t bytes) {
#ifdef EMU_THREADS
  std::lock_guard<std::mutex> lock(g_tg->alloc);  // the threadgroup's threads allocate at once
#endif
  auto& slots = g_run->tg_slots;
  if (slots.size() <= size_t(slot)) slots.resize(slot + 1, nullptr);
  if (!slots[slot]) {
    slots[slot] = std::malloc(bytes);
    std::memset(slots[slot], 0xFF, bytes);
  }
  return slots[slot];
}

inline void fiber_body() {
  Fiber* f = g_run->current;
  g_entry(g_run->bufs, &f->b);
  f->state = DONE;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

#ifdef EMU_UCONTEXT
inline void fiber_main_uc() { fiber_body(); }
#else
extern "C" void emu_fiber_main() { fiber_body(); }
#endif

inline void start_fiber(Fiber& f) {
#ifdef EMU_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, (void (*)())fiber_main_uc, 0);
#else
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                       // fake return address of emu_fiber_main
  *--sp = reinterpret_cast<void*>(&emu_fiber_main);      // `ret` target
  for (int i = 0; i < 6; ++i) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#endif
}

inline void resume(Fiber& f) {
  g_run->current = &f;
#ifdef EMU_UCONTEXT
  swapcontext(&g_run->sched, &f.ctx);
#else
  emu_switch(&g_run->sched_sp, f.sp);
#endif
}

inline std::string where(int line) { return "line " + std::to_string(line); }

// A misuse the shim detects (e.g. a simdgroup_matrix operation with inactive lanes): the first one
// is kept and the dispatch fails with it once the current scheduling round ends.
#ifdef EMU_THREADS
std::mutex g_report;
#endif
void report(int line, const char* what) {
#ifdef EMU_THREADS
  std::lock_guard<std::mutex> lock(g_report);
#endif
  if (g_run->error.empty()) g_run->error = std::string(what) + " at " + where(line);
}

// The lanes fibers[sg0, sg1) of one SIMD group, met at a collective, barrier or their end: their
// simdgroup_matrix operations must be the same (lines and arguments) and need a full SIMD group.
inline bool mats_agree(size_t sg0, size_t sg1) {
  auto& fs = g_run->fibers;
  for (size_t i = sg0; i < sg1; ++i) {
    if (fs[i].mat_ops && sg1 - sg0 < 32) {
      g_run->error = "simdgroup_matrix operation with inactive lanes in the SIMD group at " +
                     where(fs[i].mat_first);
      return false;
    }
    if (fs[i].mat_hash != fs[sg0].mat_hash || fs[i].mat_ops != fs[sg0].mat_ops) {
      int line = std::max(fs[i].mat_last, fs[sg0].mat_last);
      g_run->error = "simdgroup_matrix operations differ between the lanes of a SIMD group (a "
                     "divergent branch or per-lane arguments), at or before " + where(line);
      return false;
    }
  }
  return true;
}

inline bool all_mats_agree() {
  size_t n = g_run->fibers.size();
  for (size_t sg0 = 0; sg0 < n; sg0 += 32)
    if (!mats_agree(sg0, std::min(n, sg0 + 32))) return false;
  return true;
}

// Runs one threadgroup to completion; returns false (with g_run->error set) on divergence.
inline bool run_group(int schedule, std::mt19937_64& rng) {
  auto& fs = g_run->fibers;
  size_t n = fs.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
  for (;;) {
    if (schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order)
      if (fs[i].state == READY) resume(fs[i]);
    if (!g_run->error.empty()) return false;
    bool all_done = true, released = false;
    for (auto& f : fs) all_done &= f.state == DONE;
    if (all_done) return all_mats_agree();
    // SIMD collectives and simdgroup barriers: every lane that has not returned must stand at the
    // same one.
    std::vector<size_t> waiting;  // first fibers of the SIMD groups that can go on
    for (size_t sg0 = 0; sg0 < n; sg0 += 32) {
      size_t sg1 = std::min(n, sg0 + 32);
      int line = -1;
      State kind = READY;
      bool ok = true, any = false;
      for (size_t i = sg0; i < sg1; ++i) {
        State st = fs[i].state;
        if (st == DONE) continue;
        if (st != AT_SIMD && st != AT_SIMD_BARRIER) { ok = false; continue; }
        if (!any) { line = fs[i].line; kind = st; any = true; }
        else if (fs[i].line != line || st != kind) {
          g_run->error = "divergent SIMD collectives: lanes wait at " + where(line) + " and " +
                         where(fs[i].line);
          return false;
        }
      }
      if (!any) continue;
      if (!ok) {
        for (size_t i = sg0; i < sg1; ++i)
          if (fs[i].state == AT_BARRIER) {
            g_run->error = "SIMD collective at " + where(line) +
                           " in a divergent branch: another lane of the SIMD group waits at the "
                           "threadgroup_barrier at " + where(fs[i].line);
            return false;
          }
        continue;
      }
      waiting.push_back(sg0);
    }
    // Release the SIMD groups waiting at a collective. The random schedule holds each back for a
    // round with probability 1/4 (one always goes), so SIMD groups drift apart between barriers
    // as on a GPU and a missing barrier between them shows.
    std::vector<size_t> go;
    for (size_t sg0 : waiting)
      if (schedule != 2 || rng() % 4 != 0) go.push_back(sg0);
    if (go.empty() && !waiting.empty()) go.push_back(waiting[rng() % waiting.size()]);
    for (size_t sg0 : go) {
      size_t sg1 = std::min(n, sg0 + 32);
      uint32_t mask = 0;
      for (size_t i = sg0; i < sg1; ++i)
        if (fs[i].state != DONE) mask |= 1u << (i - sg0);
      auto& simd = g_run->simds[sg0 / 32];
      uint32_t parity = fs[sg0 + __builtin_ctz(mask)].seq & 1u;
      simd.active[parity] = mask;
      for (uint32_t lane = 0; lane < 32; ++lane)  // reading an inactive lane gives NaN poison
        if (!(mask >> lane & 1u)) std::memset(simd.slots[parity][lane], 0xFF, 32);
      for (size_t i = sg0; i < sg1; ++i)
        if (fs[i].state != DONE) fs[i].state = READY;
      if (!mats_agree(sg0, sg1)) return false;
      released = true;
    }
    if (released) continue;
    // Threadgroup barrier: every thread of the threadgroup must reach the same one.
    int line = -1, returned = 0;
    for (auto& f : fs) {
      if (f.state == DONE) { ++returned; continue; }
      if (line < 0) line = f.line;
      else if (f.line != line) {
        g_run->error = "barrier divergence: threads wait at threadgroup_barrier " + where(line) +
                       " and " + where(f.line);
        return false;
      }
    }
    if (returned) {
      g_run->error = "barrier divergence: threadgroup_barrier at " + where(line) +
                     " not reached by " + std::to_string(returned) + " thread(s) that returned";
      return false;
    }
    if (!all_mats_agree()) return false;
    for (auto& f : fs) f.state = READY;
  }
}

inline uint3 u3(uint x, uint y, uint z) { return uint3(x, y, z); }

}  // namespace emu

// dims: grid x,y,z then threadgroup x,y,z (threads). schedule: 0 forward, 1 reverse, 2 random.
extern "C" int emu_dispatch(emu::EntryFn entry, void** bufs, const uint32_t* dims, int schedule,
                            uint64_t seed, char* err, int errlen) {
  using namespace emu;
  g_entry = entry;
  Run run;
  run.bufs = bufs;
  g_run = &run;
  std::mt19937_64 rng(seed);
  uint g[3] = {dims[0], dims[1], dims[2]};
  uint t[3];
  for (int i = 0; i < 3; ++i) t[i] = std::max(1u, std::min(dims[3 + i], g[i]));
  uint ng[3] = {(g[0] + t[0] - 1) / t[0], (g[1] + t[1] - 1) / t[1], (g[2] + t[2] - 1) / t[2]};
  std::vector<uint3> groups;
  for (uint z = 0; z < ng[2]; ++z)
    for (uint y = 0; y < ng[1]; ++y)
      for (uint x = 0; x < ng[0]; ++x) groups.push_back(uint3(x, y, z));
  if (schedule == 1) std::reverse(groups.begin(), groups.end());
  if (schedule == 2) std::shuffle(groups.begin(), groups.end(), rng);
  size_t max_threads = size_t(t[0]) * t[1] * t[2];
  size_t stack_bytes = max_threads * kStack;
  char* stacks = static_cast<char*>(mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) {
    std::snprintf(err, errlen, "cannot map %zu bytes of fiber stacks", stack_bytes);
    return 1;
  }
  for (size_t i = 0; i < max_threads; ++i)  // a guard page under each stack: overflow faults
    mprotect(stacks + i * kStack, 4096, PROT_NONE);
  int rc = 0;
  for (const uint3& gp : groups) {
    uint a[3];
    for (int i = 0; i < 3; ++i) a[i] = std::min(t[i], g[i] - gp[i] * t[i]);
    size_t n = size_t(a[0]) * a[1] * a[2];
    run.fibers.assign(n, Fiber());
    run.simds.assign((n + 31) / 32, Simd());
    for (size_t i = 0; i < n; ++i) {
      Fiber& f = run.fibers[i];
      Builtins& b = f.b;
      uint lx = uint(i % a[0]), ly = uint(i / a[0] % a[1]), lz = uint(i / (size_t(a[0]) * a[1]));
      b.dispatch_threads_per_threadgroup = u3(t[0], t[1], t[2]);
      b.dispatch_simdgroups_per_threadgroup = uint((max_threads + 31) / 32);
      b.dispatch_quadgroups_per_threadgroup = uint((max_threads + 3) / 4);
      b.grid_origin = u3(0, 0, 0);
      b.grid_size = u3(g[0], g[1], g[2]);
      b.threads_per_grid = u3(g[0], g[1], g[2]);
      b.threadgroups_per_grid = u3(ng[0], ng[1], ng[2]);
      b.threads_per_threadgroup = u3(a[0], a[1], a[2]);
      b.threadgroup_position_in_grid = gp;
      b.thread_position_in_threadgroup = u3(lx, ly, lz);
      b.thread_position_in_grid = u3(gp.x * t[0] + lx, gp.y * t[1] + ly, gp.z * t[2] + lz);
      b.thread_index_in_threadgroup = uint(i);
      b.thread_index_in_simdgroup = uint(i % 32);
      b.simdgroup_index_in_threadgroup = uint(i / 32);
      b.simdgroups_per_threadgroup = uint((n + 31) / 32);
      b.thread_index_in_quadgroup = uint(i % 4);
      b.quadgroup_index_in_threadgroup = uint(i / 4);
      b.quadgroups_per_threadgroup = uint((n + 3) / 4);
      b.thread_execution_width = 32;
      b.threads_per_simdgroup = 32;
      f.stack = stacks + i * kStack;
      start_fiber(f);
    }
#ifdef EMU_THREADS
    bool ok = run_group_threads();
#else
    bool ok = run_group(schedule, rng);
#endif
    for (void* p : run.tg_slots) std::free(p);
    run.tg_slots.clear();
    if (!ok) {
      std::snprintf(err, errlen, "threadgroup (%u,%u,%u): %s", gp.x, gp.y, gp.z,
                    run.error.c_str());
      rc = 2;
      break;
    }
  }
  munmap(stacks, stack_bytes);
  g_run = nullptr;
  return rc;
}

#ifdef EMU_MAIN
extern "C" void emu_entry(void** bufs, const emu::Builtins* b);  // the kernel linked with us

// Standalone driver for the AddressSanitizer mode: argv = in_file out_file schedule seed
// gx gy gz tx ty tz. in_file: uint64 count, then per buffer uint64 size + bytes. Every buffer gets
// its own exact-size heap allocation; all buffers are written back to out_file the same way.
int main(int argc, char** argv) {
  if (argc != 11) return 64;
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 65;
  uint64_t count = 0;
  if (std::fread(&count, 8, 1, in) != 1) return 65;
  std::vector<void*> bufs(count);
  std::vector<uint64_t> sizes(count);
  for (uint64_t i = 0; i < count; ++i) {
    if (std::fread(&sizes[i], 8, 1, in) != 1) return 65;
    bufs[i] = std::malloc(sizes[i] ? sizes[i] : 1);
    if (sizes[i] && std::fread(bufs[i], 1, sizes[i], in) != sizes[i]) return 65;
  }
  std::fclose(in);
  uint32_t dims[6];
  for (int i = 0; i < 6; ++i) dims[i] = uint32_t(std::strtoul(argv[5 + i], nullptr, 10));
  char err[4096] = {0};
  int rc = emu_dispatch(emu_entry, bufs.data(), dims, std::atoi(argv[3]), std::strtoull(argv[4], nullptr, 10),
                        err, sizeof err);
  if (rc) {
    std::fprintf(stderr, "%s\n", err);
    return rc;
  }
  FILE* out = std::fopen(argv[2], "wb");
  std::fwrite(&count, 8, 1, out);
  for (uint64_t i = 0; i < count; ++i) {
    std::fwrite(&sizes[i], 8, 1, out);
    std::fwrite(bufs[i], 1, sizes[i], out);
    std::free(bufs[i]);
  }
  std::fclose(out);
  return 0;
}
#endif
