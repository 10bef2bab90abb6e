// cudasim's runtime: runs a grid's threads as fibers on the calling OS thread, one block after
// another, and implements the synchronisation points of cudasim.h with CUDA's semantics,
// stopping with a diagnostic where CUDA is undefined or would hang.
//
// Switching fibers. The portable way is ucontext (swapcontext), and it is kept
// (CUDASIM_SWITCH=ucontext; the only one off x86-64). On x86-64 a 20-instruction stack switch is
// the default, for a measured reason: the twin test makes ~30 million switches, and with
// swapcontext they took 4 min 30 s under ASan on the CI machine (3 min 38 s of it in the kernel:
// glibc saves the signal mask with a system call on every switch, and ASan's swapcontext
// interceptor clears the shadow of the whole target stack each time); the stack switch below
// takes no system call and ASan is told about each switch through its fiber annotations.
// selftest.cpp runs every case under both (the `switch` cases), so the two stay pinned together.
#include "cudasim.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#else
#define CUDASIM_ASAN 0
#endif

#if defined(__x86_64__)
// cudasim_switch_stacks(save, load): pushes the callee-saved registers (System V ABI: rbp, rbx,
// r12-r15) and the SSE and x87 control words on the current stack, stores the stack pointer in
// *save, loads `load` as the stack pointer and pops the same from there. A new fiber's stack is
// prepared (start_fiber) so that the pops end in a return to cudasim_fiber_entry.
asm(R"(
  .pushsection .text
  .globl cudasim_switch_stacks
  .type cudasim_switch_stacks, @function
cudasim_switch_stacks:
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
  .size cudasim_switch_stacks, .-cudasim_switch_stacks
  .popsection
)");
extern "C" void cudasim_switch_stacks(void** save, void* load);
#define CUDASIM_HAVE_STACK_SWITCH 1
#else
#define CUDASIM_HAVE_STACK_SWITCH 0
#endif

// Every __shared__ variable of the simulated kernels lives in this section (cudasim.h); the
// linker defines its bounds. Weak: a program without shared variables has no such section.
extern "C" char __start_cudasim_shared[] __attribute__((weak));
extern "C" char __stop_cudasim_shared[] __attribute__((weak));

namespace cudasim {
namespace {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;  // per GPU thread; ASan's frames are large
// Under ASan, the part of a reused stack whose shadow is cleared before a new fiber starts on it:
// a fiber that ended normally left poisoned frames only near the top (fiber_main's and the
// switch's); one that was stopped mid-kernel gets its whole stack cleared.
constexpr size_t kStackTopBytes = 32 * 1024;
constexpr size_t kMaxParameterBytes = 32764;  // CUDA 12.1+ on Volta and later

enum class State { kReady, kBarrier, kWarp, kExited, kFaulted };

struct Stack {
  char* base = nullptr;  // the guard page, then kStackBytes of stack
  size_t page = 0;
  bool abandoned = false;  // its last fiber was stopped mid-kernel
  char* bottom() const { return base + page; }
  char* top() const { return bottom() + kStackBytes; }
};

struct Thread {
  ucontext_t context;  // CUDASIM_SWITCH=ucontext
  void* sp = nullptr;  // the stack switch: the saved stack pointer
  State state = State::kReady;
  dim3 index;
  unsigned linear = 0;
  // Where it waits (kBarrier, kWarp) and with what.
  const char* file = "";
  int line = 0;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0, arg = 0;
  int width = 32;
  unsigned char value[16] = {};
  size_t size = 0;
  void* out = nullptr;
  unsigned* ballot = nullptr;
  void* fake_stack = nullptr;  // ASan's fake stack while switched out
};

struct Runtime {
  Schedule schedule = Schedule::kForward;
  bool use_ucontext = !CUDASIM_HAVE_STACK_SWITCH;
  Stats stats;
  bool running = false;
  // The launch being run.
  const LaunchConfig* config = nullptr;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  dim3 block_index;
  std::vector<Thread> threads;
  std::vector<Stack> stacks;
  Thread* current = nullptr;
  std::string fault;  // set by a fiber that stopped (a failed assertion, an exception)
  // The scheduler's own context and stack (for ASan's fiber annotations).
  ucontext_t scheduler;
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
};

Runtime& rt() {
  static Runtime runtime = [] {
    Runtime r;
    if (const char* env = std::getenv("CUDASIM_SCHEDULE"))
      r.schedule = std::string(env) == "reversed" ? Schedule::kReversed : Schedule::kForward;
    if (const char* env = std::getenv("CUDASIM_SWITCH")) r.use_ucontext |= std::string(env) == "ucontext";
    return r;
  }();
  return runtime;
}

std::string dims(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// "cudasim: <what> in the kernel launched at <file:line> (grid .., block ..), block (..)".
std::string prefix(const std::string& what) {
  const Runtime& r = rt();
  std::ostringstream s;
  s << "cudasim: " << what << " in the kernel launched at " << where(r.config->file, r.config->line)
    << " (grid " << dims(r.config->grid) << ", block " << dims(r.config->block) << "; "
    << schedule_name(r.schedule) << " schedule), block " << dims(r.block_index);
  return s.str();
}

std::string thread_name(const Thread& t) {
  std::ostringstream s;
  s << "thread " << dims(t.index) << " (warp " << t.linear / kWarp << ", lane " << t.linear % kWarp << ")";
  return s.str();
}

std::string waiting_at(const Thread& t) {
  switch (t.state) {
    case State::kBarrier: return "wait at __syncthreads (" + where(t.file, t.line) + ")";
    case State::kWarp:
      return "wait at " + std::string(warp_op_name(t.op)) + " (" + where(t.file, t.line) + ", mask " +
             hex(t.mask) + ")";
    case State::kExited: return "have exited";
    case State::kFaulted: return "stopped";
    case State::kReady: return "are ready";
  }
  return "?";
}

// Threads grouped by what they do: "threads 0-31 wait at ...; threads 32-255 have exited".
std::string summary(const std::vector<Thread>& threads) {
  std::ostringstream s;
  size_t i = 0;
  while (i < threads.size()) {
    const std::string what = waiting_at(threads[i]);
    size_t j = i + 1;
    while (j < threads.size() && waiting_at(threads[j]) == what) ++j;
    if (i > 0) s << "; ";
    s << (j - i == 1 ? "thread " + std::to_string(i) : "threads " + std::to_string(i) + "-" + std::to_string(j - 1))
      << " " << what;
    i = j;
  }
  return s.str();
}

// ---- fibers ----

void start_switch(void** fake_stack, const void* bottom, size_t size) {
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

void finish_switch(void* fake_stack, const void** bottom, size_t* size) {
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

// Back to the scheduler; returns when the scheduler resumes this thread. `dying`: never resumed.
void yield(Thread& t, bool dying) {
  Runtime& r = rt();
  ++r.stats.switches;
  start_switch(dying ? nullptr : &t.fake_stack, r.scheduler_bottom, r.scheduler_size);
#if CUDASIM_HAVE_STACK_SWITCH
  if (!r.use_ucontext) {
    cudasim_switch_stacks(&t.sp, r.scheduler_sp);
  } else
#endif
  {
    swapcontext(&t.context, &r.scheduler);
  }
  finish_switch(t.fake_stack, &r.scheduler_bottom, &r.scheduler_size);
}

void fiber_main() {
  Runtime& r = rt();
  finish_switch(nullptr, &r.scheduler_bottom, &r.scheduler_size);
  Thread& t = *r.current;
  try {
    r.body(r.context);
    t.state = State::kExited;
  } catch (const std::exception& e) {
    r.fault = prefix("an exception") + ", " + thread_name(t) + ": " + e.what();
    t.state = State::kFaulted;
  }
  yield(t, /*dying=*/true);
  std::abort();  // a finished thread is never resumed
}

void resume(Thread& t) {
  Runtime& r = rt();
  const Stack& stack = r.stacks[t.linear];
  r.current = &t;
  ++r.stats.switches;
  start_switch(&r.scheduler_fake_stack, stack.bottom(), kStackBytes);
#if CUDASIM_HAVE_STACK_SWITCH
  if (!r.use_ucontext) {
    cudasim_switch_stacks(&r.scheduler_sp, t.sp);
  } else
#endif
  {
    swapcontext(&r.scheduler, &t.context);
  }
  finish_switch(r.scheduler_fake_stack, nullptr, nullptr);
  r.current = nullptr;
}

extern "C" void cudasim_fiber_entry() { fiber_main(); }

// Makes `t` start at fiber_main on `stack` when first resumed.
void start_fiber(Thread& t, Stack& stack) {
#if CUDASIM_ASAN
  const size_t clear = stack.abandoned ? kStackBytes : kStackTopBytes;
  __asan_unpoison_memory_region(stack.top() - clear, clear);
#endif
  stack.abandoned = false;
#if CUDASIM_HAVE_STACK_SWITCH
  if (!rt().use_ucontext) {
    // What cudasim_switch_stacks pops, from the lowest address up: the control words, r15, r14,
    // r13, r12, rbx, rbp, then the return address (cudasim_fiber_entry, entered with the stack
    // aligned as after a call) and a zero return address of its own.
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15));
    uint64_t* sp = top - 9;
    uint32_t mxcsr = 0;
    uint16_t fpcw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    std::memset(sp, 0, 9 * sizeof(uint64_t));
    std::memcpy(sp, &mxcsr, sizeof mxcsr);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, sizeof fpcw);
    top[-2] = reinterpret_cast<uint64_t>(&cudasim_fiber_entry);
    top[-1] = 0;
    t.sp = sp;
    return;
  }
#endif
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = stack.bottom();
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = nullptr;
  makecontext(&t.context, fiber_main, 0);
}

Thread& running_thread(const char* what) {
  Thread* t = rt().current;
  if (!t) throw Error(std::string("cudasim: ") + what + " outside a kernel");
  return *t;
}

// A diagnostic raised inside a fiber: stop this thread; the scheduler throws it.
[[noreturn]] void stop_thread(Thread& t, const std::string& message) {
  Runtime& r = rt();
  if (r.fault.empty()) r.fault = message;
  t.state = State::kFaulted;
  yield(t, /*dying=*/true);
  std::abort();
}

// ---- shared memory ----

// Fills every __shared__ variable with 0xff bytes (NaN for floats, -1 for integers): what a
// block reads before any of its threads wrote it shows. Not instrumented: under ASan the section
// also holds the red zones between variables.
__attribute__((no_sanitize_address)) void poison_shared() {
  if (!__start_cudasim_shared || !__stop_cudasim_shared) return;
  volatile char* p = __start_cudasim_shared;
  for (char* q = __start_cudasim_shared; q < __stop_cudasim_shared; ++q, ++p) *p = static_cast<char>(0xff);
}

// ---- synchronisation ----

bool is_power_of_two_width(int w) { return w >= 1 && w <= 32 && (w & (w - 1)) == 0; }

// The lane whose operand lane `lane` receives (the shuffles' rules, CUDA Programming Guide).
unsigned source_lane(const Thread& t, unsigned lane) {
  const unsigned w = static_cast<unsigned>(t.width), first = lane / w * w;
  switch (t.op) {
    case WarpOp::kShflSync: return first + t.arg % w;
    case WarpOp::kShflUp: return lane % w < t.arg ? lane : lane - t.arg;
    case WarpOp::kShflDown: return lane % w + t.arg >= w ? lane : lane + t.arg;
    case WarpOp::kShflXor: {
      const unsigned src = lane ^ t.arg;
      return src >= first + w ? lane : src;  // later segments are not read: own value
    }
    default: return lane;
  }
}

bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShflSync || op == WarpOp::kShflUp || op == WarpOp::kShflDown || op == WarpOp::kShflXor;
}

// Completes every warp intrinsic of warp `warp` whose lanes have all arrived; false if none could.
bool release_warp(unsigned warp) {
  Runtime& r = rt();
  auto& threads = r.threads;
  const unsigned n = static_cast<unsigned>(threads.size());
  bool released = false;
  {
    const unsigned first = warp * kWarp, lanes = std::min(kWarp, n - first);
    for (unsigned lane = 0; lane < lanes; ++lane) {
      Thread& t = threads[first + lane];
      if (t.state != State::kWarp) continue;
      const std::string call = std::string(warp_op_name(t.op)) + " at " + where(t.file, t.line) +
                               " (mask " + hex(t.mask) + ")";
      if (!((t.mask >> lane) & 1u))
        throw Error(prefix("a warp intrinsic") + ", " + thread_name(t) + ": " + call +
                    " does not name the calling lane in its mask");
      if (is_shuffle(t.op) && !is_power_of_two_width(t.width))
        throw Error(prefix("a shuffle") + ", " + thread_name(t) + ": " + call + " has width " +
                    std::to_string(t.width) + "; it must be a power of two in [1, 32]");
      bool complete = true;
      for (unsigned k = 0; k < kWarp; ++k) {
        if (!((t.mask >> k) & 1u)) continue;
        if (k >= lanes)
          throw Error(prefix("a warp intrinsic") + ", " + thread_name(t) + ": " + call + " names lane " +
                      std::to_string(k) + ", but this warp has " + std::to_string(lanes) + " lanes");
        const Thread& other = threads[first + k];
        if (other.state == State::kExited)
          throw Error(prefix("a warp intrinsic") + ", " + thread_name(t) + ": " + call + " names lane " +
                      std::to_string(k) + ", which has exited (the result is undefined on a GPU)");
        if (other.state == State::kWarp &&
            (other.op != t.op || other.mask != t.mask || other.width != t.width))
          throw Error(prefix("different warp intrinsics meeting") + ", warp " + std::to_string(first / kWarp) +
                      ": lane " + std::to_string(lane) + " at " + call + ", lane " + std::to_string(k) + " at " +
                      warp_op_name(other.op) + " at " + where(other.file, other.line) + " (mask " +
                      hex(other.mask) + ", width " + std::to_string(other.width) + ")");
        if (other.state != State::kWarp) complete = false;  // at a barrier, for now
      }
      if (!complete) continue;
      // Every lane of the mask is here: compute each lane's result from the operands.
      unsigned ballot = 0;
      for (unsigned k = 0; k < kWarp; ++k)
        if ((t.mask >> k) & 1u) {
          int p = 0;
          std::memcpy(&p, threads[first + k].value, std::min(sizeof p, threads[first + k].size));
          if (!is_shuffle(t.op) && t.op != WarpOp::kSyncWarp && p) ballot |= 1u << k;
        }
      for (unsigned k = 0; k < kWarp; ++k) {
        if (!((t.mask >> k) & 1u)) continue;
        Thread& member = threads[first + k];
        if (is_shuffle(t.op)) {
          const unsigned src = source_lane(member, k);
          if (!((t.mask >> src) & 1u))
            throw Error(prefix("a shuffle") + ", " + thread_name(member) + ": " + call + " reads lane " +
                        std::to_string(src) + ", which is not in the mask (the value is undefined)");
          std::memcpy(member.out, threads[first + src].value, member.size);
        } else if (member.ballot) {
          *member.ballot = ballot;
        }
        member.state = State::kReady;
      }
      released = true;
    }
  }
  return released;
}

// Releases the block's barrier when every thread waits at it; false if it cannot yet.
bool release_barrier() {
  Runtime& r = rt();
  const Thread* at_barrier = nullptr;
  for (const Thread& t : r.threads) {
    if (t.state == State::kWarp || t.state == State::kReady) return false;
    if (t.state == State::kBarrier && !at_barrier) at_barrier = &t;
  }
  if (!at_barrier) return false;
  for (const Thread& t : r.threads) {
    if (t.state == State::kExited)
      throw Error(prefix("a __syncthreads not reached by every thread") + ": " + summary(r.threads) +
                  " (CUDA requires every thread of the block to reach it)");
    if (t.file != at_barrier->file || t.line != at_barrier->line)
      throw Error(prefix("threads waiting at different __syncthreads") + ": " + summary(r.threads));
  }
  for (Thread& t : r.threads) t.state = State::kReady;
  return true;
}

void run_block() {
  Runtime& r = rt();
  const dim3 b = r.config->block;
  const unsigned n = b.x * b.y * b.z;
  r.threads.resize(n);
  while (r.stacks.size() < n) {
    Stack s;
    s.page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, s.page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw Error("cudasim: cannot allocate a thread stack");
    s.base = static_cast<char*>(mem);
    mprotect(s.base, s.page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    r.stacks.push_back(s);
  }
  poison_shared();
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t = Thread();
    t.linear = i;
    t.index = dim3(i % b.x, i / b.x % b.y, i / (b.x * b.y));
    start_fiber(t, r.stacks[i]);
  }
  // Warp by warp, each as far as it can go before the next starts (its intrinsics complete as
  // soon as its lanes arrive), lanes in order; forward from warp 0, reversed from the last.
  const bool reversed = r.schedule == Schedule::kReversed;
  const unsigned warps = (n + kWarp - 1) / kWarp;
  for (;;) {
    for (unsigned k = 0; k < warps; ++k) {
      const unsigned w = reversed ? warps - 1 - k : k;
      const unsigned first = w * kWarp, lanes = std::min(kWarp, n - first);
      do {
        for (unsigned j = 0; j < lanes; ++j) {
          Thread& t = r.threads[first + (reversed ? lanes - 1 - j : j)];
          if (t.state == State::kReady) resume(t);
          if (!r.fault.empty()) throw Error(r.fault);
        }
      } while (release_warp(w));
    }
    if (std::all_of(r.threads.begin(), r.threads.end(), [](const Thread& t) { return t.state == State::kExited; }))
      return;
    if (release_barrier()) continue;
    throw Error(prefix("a deadlock (no thread can continue)") + ": " + summary(r.threads));
  }
}

void check_config(const LaunchConfig& c, size_t parameter_bytes) {
  const dim3 g = c.grid, b = c.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  std::string problem;
  if (g.x < 1 || g.y < 1 || g.z < 1 || b.x < 1 || b.y < 1 || b.z < 1) problem = "a zero grid or block dimension";
  else if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) problem = "a grid dimension above CUDA's limits (2^31-1, 65535, 65535)";
  else if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) problem = "a block above CUDA's limits (1024 threads; z at most 64)";
  else if (c.shared_bytes > 0) problem = "dynamic shared memory, which cudasim does not simulate";
  else if (parameter_bytes > kMaxParameterBytes)
    problem = "kernel parameters of " + std::to_string(parameter_bytes) + " bytes (CUDA's limit: 32764)";
  if (!problem.empty())
    throw Error("cudasim: invalid launch at " + where(c.file, c.line) + " (grid " + dims(g) + ", block " +
                dims(b) + "): " + problem + " (cudaErrorInvalidConfiguration on a GPU)");
}

}  // namespace

void set_schedule(Schedule schedule) { rt().schedule = schedule; }
void set_ucontext_switch(bool on) { rt().use_ucontext = on || !CUDASIM_HAVE_STACK_SWITCH; }
bool ucontext_switch() { return rt().use_ucontext; }
Schedule schedule() { return rt().schedule; }
const char* schedule_name(Schedule schedule) {
  return schedule == Schedule::kForward ? "forward" : "reversed";
}
Stats stats() { return rt().stats; }

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflSync: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

const dim3& thread_idx() { return running_thread("threadIdx").index; }
const dim3& block_idx() {
  running_thread("blockIdx");
  return rt().block_index;
}
const dim3& block_dim() {
  running_thread("blockDim");
  return rt().config->block;
}
const dim3& grid_dim() {
  running_thread("gridDim");
  return rt().config->grid;
}

void assert_failed(const char* cond, const char* file, int line, const char* func) {
  Thread& t = running_thread("CUDA_KERNEL_ASSERT");
  stop_thread(t, prefix("a device-side assertion") + ", " + thread_name(t) + ": `" + cond + "` failed at " +
                     where(file, line) + " in " + func);
}

void syncthreads_at(const char* file, int line) {
  Thread& t = running_thread("__syncthreads");
  t.state = State::kBarrier;
  t.file = file;
  t.line = line;
  yield(t, false);
}

void warp_collective_at(WarpOp op, const char* file, int line, unsigned mask, const void* value,
                        size_t size, unsigned arg, int width, void* out, unsigned* ballot) {
  Thread& t = running_thread(warp_op_name(op));
  t.state = State::kWarp;
  t.op = op;
  t.file = file;
  t.line = line;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.size = size;
  if (size) std::memcpy(t.value, value, size);
  t.out = out;
  t.ballot = ballot;
  yield(t, false);
}

void run_grid(const LaunchConfig& config, size_t parameter_bytes, void (*body)(void*), void* context) {
  Runtime& r = rt();
  if (r.running) throw Error("cudasim: a kernel launched from device code (dynamic parallelism is not simulated)");
  check_config(config, parameter_bytes);
  r.running = true;
  r.config = &config;
  r.body = body;
  r.context = context;
  r.fault.clear();
  ++r.stats.launches;
  const dim3 g = config.grid;
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  try {
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t i = r.schedule == Schedule::kReversed ? blocks - 1 - k : k;
      r.block_index = dim3(static_cast<unsigned>(i % g.x), static_cast<unsigned>(i / g.x % g.y),
                           static_cast<unsigned>(i / (uint64_t(g.x) * g.y)));
      run_block();
      ++r.stats.blocks;
      r.stats.threads += static_cast<int64_t>(r.threads.size());
    }
  } catch (...) {
    // Fibers stopped mid-kernel leave their frames (and, under ASan, their poisoned red zones).
    for (size_t i = 0; i < r.threads.size(); ++i)
      if (r.threads[i].state != State::kExited) r.stacks[i].abandoned = true;
    r.running = false;
    r.config = nullptr;
    throw;
  }
  r.running = false;
  r.config = nullptr;
}

}  // namespace cudasim
