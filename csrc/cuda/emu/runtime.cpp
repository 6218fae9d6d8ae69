// The SIMT emulator: CUDA threads as cooperative fibers, one CTA at a time, with the
// checks compute-sanitizer makes. Compiled WITHOUT address instrumentation; the kernel units are
// compiled with it (outline calls), and their every load and store arrives in on_access() below.
//
// Memory model emulated (what the checks call a race): shared memory is ordered between threads of a
// block only by __syncthreads (and between lanes of one warp also by __syncwarp). A byte written by one
// thread and read or written by another in the same barrier interval is a race, as racecheck reports.
// A cp.async copy writes its destination at the cp.async.wait_group that retires its group: from the
// issue until then the bytes hold poison (all ones: NaN in fp16, bf16 and fp32), and any access to them
// is reported.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace attnkern {
namespace cuda {
// The one shared-memory window: blocks run one at a time. Its size is the largest any target allows
// (sm_90: 227 KB); each launch's own dynamic size bounds the accesses.
constexpr size_t kSmemWindow = 227 * 1024;
alignas(128) unsigned char smem_raw[kSmemWindow];
}  // namespace cuda

namespace emu {
namespace {

// Fiber contexts. On x86-64 a switch saves the callee-saved registers and the FP control words on the
// old stack and loads them from the new one (no signal-mask system call, unlike swapcontext: the
// emulator switches about 64 times per warp collective); elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void attnkern_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.type attnkern_emu_switch,@function
attnkern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size attnkern_emu_switch, .-attnkern_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A fresh context that starts in entry() (which must never return) on [stack, stack + bytes).
void make_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  *--p = 0;                                    // entry's (never used) return address
  *--p = reinterpret_cast<uint64_t>(entry);    // popped by `ret`: 16-byte aligned slot
  for (int i = 0; i < 6; ++i) *--p = 0;        // rbp, rbx, r12-r15
  *--p = 0x1F80ull | (0x037Full << 32);       // mxcsr, x87 control word (the defaults)
  c.sp = p;
}
void switch_context(Context& from, Context& to) { attnkern_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 * 1024;  // per fiber: the kernels' fragments live on it
constexpr int kNoThread = -1, kManyThreads = -2;

enum class State { kRunnable, kBarrier, kCollective, kDone };
enum class Coll { kNone, kShfl, kLdmatrix, kLdmatrixTrans, kMma, kSyncwarp };

const char* coll_name(Coll c) {
  switch (c) {
    case Coll::kShfl: return "__shfl_xor_sync";
    case Coll::kLdmatrix: return "ldmatrix.x4";
    case Coll::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Coll::kMma: return "mma.sync.m16n8k16";
    case Coll::kSyncwarp: return "__syncwarp";
    default: return "?";
  }
}

struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;  // 4, 8 or 16
  int group;  // -1: not committed yet
};

// One lane's operands of a warp collective (pointers into its fiber's stack, valid while it waits).
struct CollArgs {
  uint32_t bits = 0;
  int lane_mask = 0;
  unsigned member_mask = 0;
  int width = 32;
  const void* addr = nullptr;
  uint32_t* regs = nullptr;  // ldmatrix results
  float* c = nullptr;
  const uint32_t* a = nullptr;
  uint32_t b0 = 0, b1 = 0;
  MmaType type = MmaType::kF16;
};

struct Fiber {
  Context ctx;
  unsigned char* stack = nullptr;
  State state = State::kRunnable;
  Coll coll = Coll::kNone;
  CollArgs args;
  std::vector<AsyncCopy> copies;
  int committed = 0;  // groups committed so far
  int retired = 0;    // groups retired so far
};

struct Warp {
  int arrived = 0;
  uint32_t sync_epoch = 0;  // bumped by __syncwarp
};

// Shadow state of one shared-memory byte.
struct Shadow {
  int16_t writer = kNoThread, reader = kNoThread, pending = kNoThread;
  uint32_t w_epoch = 0, r_epoch = 0, w_warp_epoch = 0, r_warp_epoch = 0;
};

struct Launch {
  std::string kernel;
  dim3 grid, block, bidx;
  size_t smem = 0;
  int nthreads = 0;
  void (*thunk)(const void*) = nullptr;
  const void* ctx = nullptr;
  uintptr_t host_stack_lo = 0, host_stack_hi = 0;
  Context sched;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int cur = -1;
  int bar_arrived = 0;
  uint32_t epoch = 1;
  bool failed = false;
  std::string error;
  KernelCounts* counts = nullptr;  // this kernel's entry of g_counts
  int64_t mma_lanes = 0, ldmatrix_lanes = 0;  // lanes arriving at a collective (32 per instruction)
};

Launch* g_launch = nullptr;                 // the launch running now (null: no kernel running)
std::mutex g_one_launch_at_a_time;           // one shared-memory window, one set of shadows
std::map<std::string, KernelCounts> g_counts;  // kernel_counts(); guarded by g_one_launch_at_a_time
std::vector<GlobalRange> g_ranges;          // global memory a kernel may touch
std::map<const void*, int> g_smem_optin;    // kernel -> its dynamic shared-memory attribute
std::vector<Shadow> g_shadow(cuda::kSmemWindow);
std::vector<unsigned char*> g_stacks;       // reused fiber stacks
cudaError_t g_last_error = cudaSuccess;

std::string demangle(const void* fn, const char* fallback) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (d) {
      std::string s(d);
      free(d);
      return s;
    }
    return info.dli_sname;
  }
  return fallback;
}

std::string where(const Launch& L, int tid) {
  std::ostringstream os;
  os << "kernel " << L.kernel << ", block (" << L.bidx.x << "," << L.bidx.y << "," << L.bidx.z << ")";
  if (tid >= 0) os << ", thread " << tid << " (warp " << tid / 32 << ", lane " << tid % 32 << ")";
  return os.str();
}

// Ends the current fiber with a report: the scheduler throws it on the launching thread.
[[noreturn]] void fail(const std::string& what, int tid = -2) {
  Launch& L = *g_launch;
  if (tid == -2) tid = L.cur;
  if (!L.failed) {
    L.failed = true;
    L.error = "attnkern cuda-emu: " + what + " [" + where(L, tid) + "]";
  }
  switch_context(L.fibers[L.cur].ctx, L.sched);
  abort();  // never resumed
}

void yield(State s) {
  Launch& L = *g_launch;
  L.fibers[L.cur].state = s;
  switch_context(L.fibers[L.cur].ctx, L.sched);
}

std::string hex(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

bool same_warp_synced(const Launch& L, int a, int b, uint32_t rec_warp_epoch) {
  return a / 32 == b / 32 && L.warps[a / 32].sync_epoch != rec_warp_epoch;
}

const char* no_sync(int other, int tid) {
  return other >= 0 && other / 32 == tid / 32 ? "same warp: no __syncwarp or __syncthreads in between"
                                              : "no __syncthreads in between";
}

// Racecheck and the cp.async poison on n shared bytes at offset `off`, by thread tid.
void shared_access(size_t off, size_t n, bool write, int tid, const char* what) {
  Launch& L = *g_launch;
  if (off + n > L.smem) {
    std::ostringstream os;
    os << "out-of-bounds shared " << (write ? "write" : "read") << " of " << n << " bytes at shared offset " << off
       << " (" << what << "; the launch has " << L.smem << " bytes of dynamic shared memory)";
    fail(os.str(), tid);
  }
  const uint32_t wep = L.warps[tid / 32].sync_epoch;
  for (size_t i = off; i < off + n; ++i) {
    Shadow& s = g_shadow[i];
    if (s.pending != kNoThread) {
      std::ostringstream os;
      os << (write ? "write to" : "read of") << " shared offset " << i << " (" << what
         << ") while a cp.async into it is in flight (issued by thread " << s.pending
         << ", not yet retired by cp.async.wait_group): its bytes hold poison";
      fail(os.str(), tid);
    }
    if (s.w_epoch == L.epoch && s.writer != tid && !same_warp_synced(L, s.writer, tid, s.w_warp_epoch)) {
      std::ostringstream os;
      os << "shared-memory race: " << (write ? "write-after-write" : "read-after-write") << " hazard at shared offset "
         << i << " (" << what << "): thread " << s.writer
         << " wrote it in the same barrier interval (" << no_sync(s.writer, tid) << ")";
      fail(os.str(), tid);
    }
    if (write && s.r_epoch == L.epoch && s.reader != tid &&
        (s.reader == kManyThreads || !same_warp_synced(L, s.reader, tid, s.r_warp_epoch))) {
      std::ostringstream os;
      os << "shared-memory race: write-after-read hazard at shared offset " << i << " (" << what << "): "
         << (s.reader == kManyThreads ? std::string("other threads") : "thread " + std::to_string(s.reader))
         << " read it in the same barrier interval (" << no_sync(s.reader, tid) << ")";
      fail(os.str(), tid);
    }
    if (write) {
      s.writer = int16_t(tid), s.w_epoch = L.epoch, s.w_warp_epoch = wep;
    } else if (s.r_epoch != L.epoch) {
      s.reader = int16_t(tid), s.r_epoch = L.epoch, s.r_warp_epoch = wep;
    } else if (s.reader != tid) {
      s.reader = kManyThreads;
    }
  }
}

uintptr_t smem_base() { return reinterpret_cast<uintptr_t>(cuda::smem_raw); }

bool in_smem(uintptr_t a) { return a >= smem_base() && a < smem_base() + cuda::kSmemWindow; }

// Global accesses: inside one tensor passed in, or a report.
void global_access(uintptr_t a, size_t n, bool write, const char* what) {
  for (const GlobalRange& r : g_ranges) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(r.begin), hi = reinterpret_cast<uintptr_t>(r.end);
    if (a >= lo && a + n <= hi) return;
  }
  std::ostringstream os;
  os << "out-of-bounds global " << (write ? "write" : "read") << " of " << n << " bytes at " << hex((void*)a) << " ("
     << what << ")";
  // Name the nearest tensor, to say by how much it missed.
  const GlobalRange* best = nullptr;
  intptr_t dist = 0;
  for (const GlobalRange& r : g_ranges) {
    const intptr_t lo = intptr_t(r.begin), hi = intptr_t(r.end), x = intptr_t(a);
    const intptr_t d = x < lo ? lo - x : (x >= hi ? x - hi + 1 : 0);
    if (!best || d < dist) best = &r, dist = d;
  }
  if (best) {
    const intptr_t x = intptr_t(a), lo = intptr_t(best->begin), hi = intptr_t(best->end);
    os << "; nearest tensor: " << best->name << " [" << best->begin << ", " << best->end << "), "
       << (x < lo ? std::to_string(lo - x) + " bytes before it" : std::to_string(x + intptr_t(n) - hi) + " bytes past its end");
  } else {
    os << "; no tensor was passed in";
  }
  fail(os.str());
}

// Every instrumented load and store of the kernel units.
void on_access(uintptr_t a, size_t n, bool write) {
  Launch* L = g_launch;
  if (!L || L->cur < 0) return;  // not inside a kernel (the emulator's own host code)
  if (in_smem(a)) return shared_access(a - smem_base(), n, write, L->cur, write ? "store" : "load");
  const Fiber& f = L->fibers[L->cur];
  const uintptr_t st = reinterpret_cast<uintptr_t>(f.stack);
  if (a >= st && a < st + kStackBytes) return;                          // the thread's registers and locals
  if (a >= L->host_stack_lo && a < L->host_stack_hi) return;            // the launch's arguments
  for (const GlobalRange& r : g_ranges) {
    if (a >= reinterpret_cast<uintptr_t>(r.begin) && a + n <= reinterpret_cast<uintptr_t>(r.end)) {
      if (!write) L->counts->sync_load_bytes[r.name] += int64_t(n);
      return;
    }
  }
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(a), &info) && info.dli_fbase) return;  // constants of a loaded module
  global_access(a, n, write, write ? "store" : "load");
}

// ---------------------------------------------------------------------------------------------------
// Warp collectives: each lane arrives with its operands; the last to arrive runs the operation for all.

uint32_t b16_at(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
  return v;
}

float b16_to_float(uint32_t bits, MmaType t) {
  if (t == MmaType::kBF16) {
    const uint32_t u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = uint16_t(bits);
  return __half2float(__half(r));
}

void run_collective(Launch& L, int w, int lanes, Coll kind) {
  Fiber* f = &L.fibers[w * 32];
  switch (kind) {
    case Coll::kSyncwarp:
      ++L.warps[w].sync_epoch;
      break;
    case Coll::kShfl: {
      uint32_t in[32];
      for (int l = 0; l < lanes; ++l) in[l] = f[l].args.bits;
      for (int l = 0; l < lanes; ++l) {
        const CollArgs& a = f[l].args;
        if (a.member_mask != 0xffffffffu || a.width != 32) {
          fail("__shfl_xor_sync with a partial mask or width: the emulator supports full warps only", w * 32 + l);
        }
        const int src = l ^ a.lane_mask;
        f[l].args.bits = src < lanes ? in[src] : in[l];
      }
      break;
    }
    case Coll::kLdmatrix:
    case Coll::kLdmatrixTrans: {
      // Lane 8j + r supplies the address of row r of matrix j (16 bytes: 8 b16 elements).
      for (int l = 0; l < 32; ++l) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(f[l].args.addr);
        if (!in_smem(a)) fail("ldmatrix address " + hex((void*)a) + " is not in shared memory", w * 32 + l);
        if (a % 16) fail("ldmatrix row address " + hex((void*)a) + " is not 16-byte aligned", w * 32 + l);
        shared_access(a - smem_base(), 16, false, w * 32 + l, coll_name(kind));
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int j = 0; j < 4; ++j) {
          uint32_t lo, hi;
          if (kind == Coll::kLdmatrix) {  // row g, columns 2t, 2t + 1
            const void* row = f[8 * j + g].args.addr;
            lo = b16_at(row, 2 * t), hi = b16_at(row, 2 * t + 1);
          } else {  // transposed: rows 2t, 2t + 1 of column g
            lo = b16_at(f[8 * j + 2 * t].args.addr, g), hi = b16_at(f[8 * j + 2 * t + 1].args.addr, g);
          }
          f[l].args.regs[j] = lo | (hi << 16);
        }
      }
      break;
    }
    case Coll::kMma: {
      // Gather A (16x16), B (16x8, k x n) and C (16x8) from the lanes' fragments (PTX ISA layouts).
      const MmaType type = f[0].args.type;
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const CollArgs& a = f[l].args;
        if (a.type != type) fail("mma.sync lanes disagree on the input type", w * 32 + l);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
          A[row][col] = b16_to_float(a.a[i] & 0xffff, type);
          A[row][col + 1] = b16_to_float(a.a[i] >> 16, type);
        }
        B[2 * t][g] = b16_to_float(a.b0 & 0xffff, type);
        B[2 * t + 1][g] = b16_to_float(a.b0 >> 16, type);
        B[2 * t + 8][g] = b16_to_float(a.b1 & 0xffff, type);
        B[2 * t + 9][g] = b16_to_float(a.b1 >> 16, type);
        C[g][2 * t] = a.c[0], C[g][2 * t + 1] = a.c[1], C[g + 8][2 * t] = a.c[2], C[g + 8][2 * t + 1] = a.c[3];
      }
      float D[16][8];
      for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
          // Products of 16-bit inputs are exact in fp32; the sum is taken in fp32 onto C.
          float acc = 0.f;
          for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
          D[i][j] = C[i][j] + acc;
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        float* c = f[l].args.c;
        c[0] = D[g][2 * t], c[1] = D[g][2 * t + 1], c[2] = D[g + 8][2 * t], c[3] = D[g + 8][2 * t + 1];
      }
      break;
    }
    default:
      break;
  }
}

// This lane arrives at a collective; returns once the whole warp has run it.
void collective(Coll kind, bool needs_full_warp) {
  Launch& L = *g_launch;
  const int tid = L.cur, w = tid / 32;
  const int lanes = std::min(32, L.nthreads - w * 32);
  if (needs_full_warp && lanes != 32) fail(std::string(coll_name(kind)) + " in a partial warp");
  Fiber& me = L.fibers[tid];
  me.coll = kind;
  Warp& wp = L.warps[w];
  if (++wp.arrived < lanes) {
    yield(State::kCollective);
    return;
  }
  // Everyone is here: the lanes must all be at the same kind of collective.
  for (int l = 0; l < lanes; ++l) {
    const Fiber& o = L.fibers[w * 32 + l];
    if (o.coll != kind) {
      fail(std::string("warp collective mismatch: lane ") + std::to_string(l) + " is at " + coll_name(o.coll) +
           ", this lane at " + coll_name(kind));
    }
  }
  wp.arrived = 0;
  run_collective(L, w, lanes, kind);
  for (int l = 0; l < lanes; ++l) {
    Fiber& o = L.fibers[w * 32 + l];
    o.coll = Coll::kNone;
    if (w * 32 + l != tid) o.state = State::kRunnable;
  }
}

void retire(Fiber& f, int tid, int upto_group) {
  Launch& L = *g_launch;
  size_t kept = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    AsyncCopy& c = f.copies[i];
    if (c.group >= 0 && c.group < upto_group) {
      const size_t off = c.dst - cuda::smem_raw;
      for (int b = 0; b < c.bytes; ++b) g_shadow[off + b].pending = kNoThread;
      std::memcpy(c.dst, c.data, c.bytes);
      // The copy's write lands now, as this thread's write in this barrier interval.
      for (int b = 0; b < c.bytes; ++b) {
        Shadow& s = g_shadow[off + b];
        s.writer = int16_t(tid), s.w_epoch = L.epoch, s.w_warp_epoch = L.warps[tid / 32].sync_epoch;
      }
    } else {
      f.copies[kept++] = c;
    }
  }
  f.copies.resize(kept);
}

void fiber_main() {
  Launch& L = *g_launch;
  L.thunk(L.ctx);
  L.fibers[L.cur].state = State::kDone;
  switch_context(L.fibers[L.cur].ctx, L.sched);  // never resumed
  abort();
}

std::string describe_threads(const Launch& L) {
  // Group consecutive threads in the same state for a short report.
  std::ostringstream os;
  int i = 0;
  while (i < L.nthreads) {
    const Fiber& f = L.fibers[i];
    int j = i;
    while (j + 1 < L.nthreads && L.fibers[j + 1].state == f.state && L.fibers[j + 1].coll == f.coll) ++j;
    os << (i ? "; " : "") << "threads " << i << "-" << j << ": ";
    switch (f.state) {
      case State::kBarrier: os << "waiting at __syncthreads"; break;
      case State::kCollective: os << "waiting at " << coll_name(f.coll); break;
      case State::kDone: os << "exited"; break;
      default: os << "runnable"; break;
    }
    i = j + 1;
  }
  return os.str();
}

}  // namespace

unsigned max_grid_yz() {
  const char* env = std::getenv("ATTNKERN_EMU_MAX_GRID_YZ");
  const long v = env && *env ? std::strtol(env, nullptr, 10) : 65535;
  return unsigned(v >= 1 && v <= 65535 ? v : 65535);
}

namespace {

void check_launch(const Launch& L, const void* kernel) {
  std::ostringstream os;
  const unsigned max_yz = max_grid_yz();
  const uint64_t threads = uint64_t(L.block.x) * L.block.y * L.block.z;
  if (threads == 0 || threads > 1024 || L.block.z > 64) {
    os << "launch of " << threads << " threads per block (block " << L.block.x << "x" << L.block.y << "x" << L.block.z
       << "): at most 1024, z at most 64";
  } else if (L.grid.x == 0 || L.grid.y == 0 || L.grid.z == 0 || L.grid.y > max_yz || L.grid.z > max_yz ||
             L.grid.x > 2147483647u) {
    os << "launch grid " << L.grid.x << "x" << L.grid.y << "x" << L.grid.z
       << " outside the limits (x in [1, 2^31 - 1], y and z in [1, " << max_yz << "])";
  } else if (L.smem > 48 * 1024) {
    auto it = g_smem_optin.find(kernel);
    if (it == g_smem_optin.end() || size_t(it->second) < L.smem) {
      os << "launch with " << L.smem << " bytes of dynamic shared memory (over 48 KB) without "
         << "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allowing that much";
    }
  }
  if (!os.str().empty()) throw std::runtime_error("attnkern cuda-emu: " + os.str() + " [kernel " + L.kernel + "]");
}

}  // namespace

// The targets a launch must fit: ATTNKERN_EMU_ARCHS ("80;86;89;90" by default), with the dynamic
// shared memory each allows per block (the opt-in maximum); unknown entries are skipped.
struct SmemTarget {
  int arch;
  int max_bytes;
};

std::vector<SmemTarget> smem_targets() {
  static const std::map<int, int> kMax = {{80, 163 * 1024}, {86, 99 * 1024}, {87, 163 * 1024},
                                          {89, 99 * 1024},  {90, 227 * 1024}, {100, 227 * 1024},
                                          {120, 99 * 1024}};
  const char* env = std::getenv("ATTNKERN_EMU_ARCHS");
  std::string s = env && *env ? env : "80;86;89;90";
  std::vector<SmemTarget> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ';')) {
    std::string digits;
    for (char ch : item) {
      if (isdigit(static_cast<unsigned char>(ch))) digits += ch;
    }
    if (digits.empty()) continue;
    const int arch = std::stoi(digits);
    auto it = kMax.find(arch);
    if (it != kMax.end()) out.push_back({arch, it->second});
  }
  return out;
}

uint3 thread_idx() { return make_uint3(unsigned(g_launch->cur), 0, 0); }
uint3 block_idx() { return g_launch->bidx; }
dim3 block_dim() { return g_launch->block; }
dim3 grid_dim() { return g_launch->grid; }

void syncthreads() {
  Launch& L = *g_launch;
  if (++L.bar_arrived < L.nthreads) {
    yield(State::kBarrier);
    return;
  }
  L.bar_arrived = 0;
  ++L.epoch;  // a new barrier interval
  for (Fiber& f : L.fibers) {
    if (f.state == State::kBarrier) f.state = State::kRunnable;
  }
}

void syncwarp() { collective(Coll::kSyncwarp, false); }

uint32_t shfl_xor(uint32_t bits, int lane_mask, unsigned member_mask, int width) {
  Fiber& f = g_launch->fibers[g_launch->cur];
  f.args.bits = bits, f.args.lane_mask = lane_mask, f.args.member_mask = member_mask, f.args.width = width;
  collective(Coll::kShfl, true);
  return f.args.bits;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  ++g_launch->ldmatrix_lanes;
  Fiber& f = g_launch->fibers[g_launch->cur];
  f.args.addr = smem, f.args.regs = r;
  collective(trans ? Coll::kLdmatrixTrans : Coll::kLdmatrix, true);
}

void mma_16816(MmaType type, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ++g_launch->mma_lanes;
  Fiber& f = g_launch->fibers[g_launch->cur];
  f.args.type = type, f.args.c = c, f.args.a = a, f.args.b0 = b0, f.args.b1 = b1;
  collective(Coll::kMma, true);
}

float ex2_approx_ftz(float x) {
  if (g_launch) ++g_launch->counts->ex2_lanes;
  if (std::fabs(x) < FLT_MIN) x = 0.f;  // .ftz: subnormal inputs and outputs flush to zero
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
}

// The name of the tensor holding [a, a + n) (global_access has checked that one does).
const char* range_name(uintptr_t a, size_t n) {
  for (const GlobalRange& r : g_ranges) {
    if (a >= reinterpret_cast<uintptr_t>(r.begin) && a + n <= reinterpret_cast<uintptr_t>(r.end)) return r.name;
  }
  return "?";
}

void cp_async(void* smem, const void* gmem, int bytes, bool valid) {
  Launch& L = *g_launch;
  const int tid = L.cur;
  const uintptr_t d = reinterpret_cast<uintptr_t>(smem), s = reinterpret_cast<uintptr_t>(gmem);
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async of " + std::to_string(bytes) + " bytes: 4, 8 or 16");
  if (!in_smem(d)) fail("cp.async destination " + hex(smem) + " is not in shared memory");
  if (d % bytes || s % bytes) {
    fail("cp.async of " + std::to_string(bytes) + " bytes from " + hex(gmem) + " to " + hex(smem) + ": not " +
         std::to_string(bytes) + "-byte aligned");
  }
  const size_t off = d - smem_base();
  shared_access(off, bytes, true, tid, "cp.async destination");
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(smem);
  c.bytes = bytes;
  c.group = -1;
  if (valid) {
    global_access(s, bytes, false, "cp.async source");
    L.counts->async_load_bytes[range_name(s, bytes)] += bytes;
    std::memcpy(c.data, gmem, bytes);
  } else {
    std::memset(c.data, 0, bytes);  // src-size 0: zero-fill
  }
  std::memset(smem, 0xff, bytes);  // poison until retired
  for (int b = 0; b < bytes; ++b) g_shadow[off + b].pending = int16_t(tid);
  L.fibers[tid].copies.push_back(c);
}

void cp_async_commit() {
  Fiber& f = g_launch->fibers[g_launch->cur];
  for (AsyncCopy& c : f.copies) {
    if (c.group < 0) c.group = f.committed;
  }
  ++f.committed;
}

void cp_async_wait(int n) {
  Launch& L = *g_launch;
  Fiber& f = L.fibers[L.cur];
  // Groups [0, committed - n) are complete when this returns.
  const int upto = f.committed - n;
  if (upto > f.retired) {
    retire(f, L.cur, upto);
    f.retired = upto;
  }
}

std::atomic<int64_t> g_attribute_calls{0};

int64_t attribute_calls() { return g_attribute_calls.load(); }

std::map<std::string, KernelCounts> kernel_counts() {
  std::lock_guard<std::mutex> lock(g_one_launch_at_a_time);
  return g_counts;
}
void reset_kernel_counts() {
  std::lock_guard<std::mutex> lock(g_one_launch_at_a_time);
  g_counts.clear();
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, const char* name, cudaFuncAttribute attr, int value) {
  ++g_attribute_calls;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  for (const SmemTarget& t : smem_targets()) {
    if (value > t.max_bytes) {
      std::ostringstream os;
      os << "attnkern cuda-emu: " << demangle(kernel, name) << " needs " << value
         << " bytes of dynamic shared memory; sm_" << t.arch << " allows at most " << t.max_bytes
         << " (targets: ATTNKERN_EMU_ARCHS)";
      throw std::runtime_error(os.str());
    }
  }
  g_smem_optin[kernel] = value;
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

GlobalRanges::GlobalRanges(std::initializer_list<GlobalRange> ranges) : count_(ranges.size()) {
  g_ranges.insert(g_ranges.end(), ranges.begin(), ranges.end());
}
GlobalRanges::~GlobalRanges() { g_ranges.resize(g_ranges.size() - count_); }

void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
            void (*thunk)(const void*), const void* ctx) {
  std::lock_guard<std::mutex> lock(g_one_launch_at_a_time);
  Launch L;
  L.kernel = demangle(kernel, name);
  L.grid = grid, L.block = block, L.smem = smem_bytes;
  L.thunk = thunk, L.ctx = ctx;
  L.host_stack_lo = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  L.host_stack_hi = L.host_stack_lo + (1 << 20);
  check_launch(L, kernel);
  for (const SmemTarget& t : smem_targets()) {
    if (smem_bytes > size_t(t.max_bytes)) {
      std::ostringstream os;
      os << "attnkern cuda-emu: launch with " << smem_bytes << " bytes of dynamic shared memory cannot run on sm_"
         << t.arch << " (at most " << t.max_bytes << ") [kernel " << L.kernel << "]";
      throw std::runtime_error(os.str());
    }
  }
  if (block.y != 1 || block.z != 1) throw std::runtime_error("attnkern cuda-emu: only 1-D blocks are emulated");
  L.nthreads = int(block.x);
  L.fibers.resize(L.nthreads);
  L.warps.resize((L.nthreads + 31) / 32);
  while (g_stacks.size() < size_t(L.nthreads)) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("attnkern cuda-emu: cannot map fiber stacks");
    g_stacks.push_back(static_cast<unsigned char*>(p));
  }
  // Barrier intervals are numbered across launches, so that shadow records left by an earlier launch
  // (one that failed mid-block included) never match a later interval.
  static uint32_t epoch = 1;
  struct Reset {
    Launch& L;
    uint32_t& epoch;
    ~Reset() {
      epoch = std::max(epoch, L.epoch);
      if (L.counts) L.counts->mma += L.mma_lanes / 32, L.counts->ldmatrix += L.ldmatrix_lanes / 32;
      g_launch = nullptr;
    }
  } reset{L, epoch};
  L.counts = &g_counts[L.kernel];
  ++L.counts->launches;
  L.counts->ctas += int64_t(grid.x) * grid.y * grid.z;
  g_launch = &L;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        L.bidx = make_uint3(bx, by, bz);
        L.epoch = ++epoch;
        L.bar_arrived = 0;
        std::memset(cuda::smem_raw, 0xff, smem_bytes);  // uninitialized shared memory reads as NaN
        for (size_t i = 0; i < smem_bytes; ++i) g_shadow[i].pending = kNoThread;
        for (Warp& w : L.warps) w = Warp();
        for (int t = 0; t < L.nthreads; ++t) {
          Fiber& f = L.fibers[t];
          f.state = State::kRunnable, f.coll = Coll::kNone, f.copies.clear(), f.committed = f.retired = 0;
          f.stack = g_stacks[t];
          make_context(f.ctx, f.stack, kStackBytes, fiber_main);
        }
        int done = 0;
        while (done < L.nthreads) {
          bool progressed = false;
          for (int t = 0; t < L.nthreads; ++t) {
            if (L.fibers[t].state != State::kRunnable) continue;
            L.cur = t;
            switch_context(L.sched, L.fibers[t].ctx);
            L.cur = -1;
            if (L.failed) throw std::runtime_error(L.error);
            progressed = true;
            if (L.fibers[t].state == State::kDone) ++done;
          }
          if (!progressed && done < L.nthreads) {
            throw std::runtime_error("attnkern cuda-emu: deadlock: " + describe_threads(L) + " [" + where(L, -1) +
                                     "]");
          }
        }
        epoch = std::max(epoch, L.epoch);
      }
    }
  }
}

}  // namespace emu
}  // namespace attnkern

// The instrumentation entry points the kernel units call (gcc -fsanitize=kernel-address with
// --param asan-instrumentation-with-call-threshold=0). Hidden: they resolve inside this library and
// never interpose on a real sanitizer's runtime elsewhere in the process.
extern "C" {
#define ATTNKERN_EMU_HIDDEN __attribute__((visibility("hidden")))
#define ATTNKERN_EMU_ACCESS(n)                                                                              \
  ATTNKERN_EMU_HIDDEN void __asan_load##n##_noabort(uintptr_t a) { attnkern::emu::on_access(a, n, false); } \
  ATTNKERN_EMU_HIDDEN void __asan_store##n##_noabort(uintptr_t a) { attnkern::emu::on_access(a, n, true); }
ATTNKERN_EMU_ACCESS(1)
ATTNKERN_EMU_ACCESS(2)
ATTNKERN_EMU_ACCESS(4)
ATTNKERN_EMU_ACCESS(8)
ATTNKERN_EMU_ACCESS(16)
#undef ATTNKERN_EMU_ACCESS
ATTNKERN_EMU_HIDDEN void __asan_loadN_noabort(uintptr_t a, size_t n) { attnkern::emu::on_access(a, n, false); }
ATTNKERN_EMU_HIDDEN void __asan_storeN_noabort(uintptr_t a, size_t n) { attnkern::emu::on_access(a, n, true); }
ATTNKERN_EMU_HIDDEN void __asan_handle_no_return() {}
#undef ATTNKERN_EMU_HIDDEN
}
