// cudasim's own tests: the semantics the real kernels rely on give the right values, and every
// planted bug (planted_kernels.cu) is caught, by a diagnostic or by a wrong result under one of
// the schedules.
//   cudasim_selftest all|<case> forward|reversed
// `out_of_bounds_write` (global memory) and `shared_out_of_bounds_write` (a __shared__ array) are
// run alone: AddressSanitizer stops the process there (ctest expects its report).
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "../require.h"
#include "cudasim.h"

namespace planted {
void launch_block_sums(const float* in, int64_t n, float* out, int blocks);
void launch_warp_semantics(const int* in, int width, int arg, int* out);
void launch_half_warps(const int* in, int* out);
void launch_shared_exchange(int* out, int blocks);
void launch_indices(int* out, dim3 grid, dim3 block);
void launch_atomic_sum(const float* in, int64_t n, float* total);
void launch_checked_gather(const int64_t* ids, int64_t n, int64_t T, const float* table, float* out);
void launch_block_sums_missing_sync(const float* in, int64_t n, float* out);
void launch_broadcast_without_barrier(float value, float* out);
void launch_read_unwritten_shared(float* out);
void launch_divergent_barrier(int* out);
void launch_barrier_after_exit(int* out);
void launch_shuffle_after_exit(const float* in, float* out);
void launch_mixed_intrinsics(const int* in, int* out);
void launch_mask_without_self(const int* in, int* out);
void launch_barrier_inside_warp_op(const int* in, int* out);
void launch_write_one_past(float* out, int64_t n);
void launch_with_block(int* out, dim3 block);
void launch_shared_write_past_end(float* out);
}  // namespace planted

namespace {


// Runs fn, which must throw cudasim::Error whose message contains every one of `parts`.
void expect_diagnostic(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  std::string message;
  try {
    fn();
  } catch (const cudasim::Error& e) {
    message = e.what();
  }
  REQUIRE(!message.empty(), "no diagnostic was raised");
  for (const auto& part : parts)
    REQUIRE(message.find(part) != std::string::npos, "the diagnostic lacks \"" << part << "\": " << message);
  std::cout << "    diagnostic: " << message << "\n";
}

std::vector<float> ramp(int64_t n) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 17) - 8.f;  // exact sums in float
  return v;
}

// ---- semantics ----

void block_sums_correct() {
  for (int64_t n : {1, 255, 256, 257, 5000}) {
    const auto in = ramp(n);
    const int blocks = 3;
    std::vector<float> out(blocks);
    planted::launch_block_sums(in.data(), n, out.data(), blocks);
    double want = 0;
    for (float x : in) want += x;
    double got = 0;
    for (float x : out) got += x;
    REQUIRE(got == want, "n " << n << ": block sums add to " << got << ", expected " << want);
  }
}

void warp_semantics_correct() {
  std::vector<int> in(32);
  for (int i = 0; i < 32; ++i) in[i] = (i * 7 + 3) % 32;
  for (int width : {1, 2, 4, 8, 16, 32})
    for (int arg : {0, 1, 3, 5, 16, 31}) {
      std::vector<int> out(8 * 32, -99);
      planted::launch_warp_semantics(in.data(), width, arg, out.data());
      unsigned ballot = 0;
      bool any = false, all = true;
      for (int k = 0; k < 32; ++k) {
        if (in[k] % 3 == 0) ballot |= 1u << k;
        any |= in[k] == 7;
        all &= in[k] >= 0;
      }
      for (int lane = 0; lane < 32; ++lane) {
        // The CUDA Programming Guide's rules, written out independently of the runtime.
        const int first = lane / width * width, pos = lane % width;
        const int sync_src = first + arg % width;
        const int up_src = pos < arg ? lane : lane - arg;
        const int down_src = pos + arg >= width ? lane : lane + arg;
        const int xor_src = (lane ^ arg) >= first + width ? lane : (lane ^ arg);
        const int* o = &out[8 * lane];
        const auto v = static_cast<unsigned>(in[lane]);
        const int want[8] = {in[sync_src], in[up_src], in[down_src], in[xor_src], static_cast<int>(ballot),
                             any, all, __builtin_popcount(v) + __builtin_popcountll(static_cast<unsigned long long>(v) << 40)};
        for (int k = 0; k < 8; ++k)
          REQUIRE(o[k] == want[k], "width " << width << " arg " << arg << " lane " << lane << " result " << k
                                            << ": " << o[k] << ", expected " << want[k]);
      }
    }
}

void half_warps_correct() {
  std::vector<int> in(32), out(32);
  for (int i = 0; i < 32; ++i) in[i] = 100 + i;
  planted::launch_half_warps(in.data(), out.data());
  for (int i = 0; i < 32; ++i) REQUIRE(out[i] == in[i ^ 1], "lane " << i << ": " << out[i]);
}

void shared_memory_after_barrier() {
  const int blocks = 3, n = 256;
  std::vector<int> out(blocks * n);
  planted::launch_shared_exchange(out.data(), blocks);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t)
      REQUIRE(out[b * n + t] == (t + 1) % n * 3 + b, "block " << b << " thread " << t << ": " << out[b * n + t]);
}

void indices_2d() {
  const dim3 grid(3, 2), block(8, 4);
  std::vector<int> out(3 * 2 * 8 * 4, -1);
  planted::launch_indices(out.data(), grid, block);
  for (unsigned by = 0; by < 2; ++by)
    for (unsigned bx = 0; bx < 3; ++bx)
      for (unsigned ty = 0; ty < 4; ++ty)
        for (unsigned tx = 0; tx < 8; ++tx) {
          const size_t i = ((by * 3 + bx) * 32) + ty * 8 + tx;
          REQUIRE(out[i] == static_cast<int>(bx * 1000000 + by * 10000 + tx * 100 + ty), "at " << i);
        }
}

void atomics_correct() {
  const auto in = ramp(1000);
  float total = 0;
  planted::launch_atomic_sum(in.data(), 1000, &total);
  double want = 0;
  for (float x : in) want += x;
  REQUIRE(total == want, total << " != " << want);
}

void invalid_launches_refused() {
  std::vector<int> out(4096);
  expect_diagnostic([&] { planted::launch_with_block(out.data(), dim3(2048)); }, {"invalid launch", "1024 threads"});
  expect_diagnostic([&] { planted::launch_with_block(out.data(), dim3(8, 8, 128)); }, {"invalid launch"});
  expect_diagnostic([&] { planted::launch_indices(out.data(), dim3(0), dim3(32)); }, {"zero grid"});
}

void device_assert_names_the_thread() {
  const std::vector<int64_t> ids = {0, 1, 2, 1, 5, 0};
  const std::vector<float> table = {10, 11, 12};
  std::vector<float> out(ids.size());
  expect_diagnostic([&] { planted::launch_checked_gather(ids.data(), 6, 3, table.data(), out.data()); },
                    {"device-side assertion", "t >= 0 && t < T", "thread (4,0,0)", "planted_kernels.cu"});
}

// ---- planted bugs ----

void missing_syncthreads_caught() {
  // Forward: warp 0 reads the other warps' sums before they are written (shared memory still
  // holds the 0xff fill: NaN). Either schedule must not give the right sum.
  const auto in = ramp(1000);
  double want = 0;
  for (float x : in) want += x;
  float out = 0;
  planted::launch_block_sums_missing_sync(in.data(), 1000, &out);
  std::cout << "    " << cudasim::schedule_name(cudasim::schedule()) << " schedule: sum " << out << " (right: " << want << ")\n";
  if (cudasim::schedule() == cudasim::Schedule::kForward) REQUIRE(!(out == want), "the missing barrier went unseen");
}

void race_caught_by_reversed_schedule() {
  std::vector<float> out(64);
  planted::launch_broadcast_without_barrier(5.f, out.data());
  int wrong = 0;
  for (float x : out) wrong += !(x == 5.f);
  std::cout << "    " << cudasim::schedule_name(cudasim::schedule()) << " schedule: " << wrong << " of 64 threads read a stale value\n";
  if (cudasim::schedule() == cudasim::Schedule::kReversed) REQUIRE(wrong > 0, "the race went unseen");
}

void unwritten_shared_reads_nan() {
  std::vector<float> out(8, 0.f);
  planted::launch_read_unwritten_shared(out.data());
  for (float x : out) REQUIRE(std::isnan(x), "read " << x);
}

void divergent_barrier_caught() {
  std::vector<int> out(256);
  expect_diagnostic([&] { planted::launch_divergent_barrier(out.data()); },
                    {"different __syncthreads", "threads 0-127", "threads 128-255", "planted_kernels.cu"});
}

void barrier_after_exit_caught() {
  std::vector<int> out(256);
  expect_diagnostic([&] { planted::launch_barrier_after_exit(out.data()); },
                    {"not reached by every thread", "threads 200-255 have exited"});
}

void shuffle_after_exit_caught() {
  std::vector<float> in(32, 1.f), out(32);
  expect_diagnostic([&] { planted::launch_shuffle_after_exit(in.data(), out.data()); },
                    {"__shfl_down_sync", "names lane 16, which has exited"});
}

void mixed_intrinsics_caught() {
  std::vector<int> in(32, 1), out(32);
  expect_diagnostic([&] { planted::launch_mixed_intrinsics(in.data(), out.data()); },
                    {"different warp intrinsics", "__ballot_sync", "__shfl_down_sync"});
}

void mask_without_self_caught() {
  std::vector<int> in(32, 1), out(32);
  expect_diagnostic([&] { planted::launch_mask_without_self(in.data(), out.data()); },
                    {"does not name the calling lane", "lane 0"});
}

void deadlock_caught() {
  std::vector<int> in(32, 1), out(32);
  expect_diagnostic([&] { planted::launch_barrier_inside_warp_op(in.data(), out.data()); },
                    {"deadlock", "threads 0-15 wait at __shfl_xor_sync", "threads 16-31 wait at __syncthreads"});
}

void shared_out_of_bounds_write() {
  std::vector<float> out(9);
  planted::launch_shared_write_past_end(out.data());
  std::cout << "    no report: this case must run under AddressSanitizer\n";
}

void out_of_bounds_write() {
  const int64_t n = 100;
  std::unique_ptr<float[]> out(new float[n]);
  planted::launch_write_one_past(out.get(), n);
  std::cout << "    no report: this case must run under AddressSanitizer\n";
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"block_sums_correct", block_sums_correct},
      {"warp_semantics_correct", warp_semantics_correct},
      {"half_warps_correct", half_warps_correct},
      {"shared_memory_after_barrier", shared_memory_after_barrier},
      {"indices_2d", indices_2d},
      {"atomics_correct", atomics_correct},
      {"invalid_launches_refused", invalid_launches_refused},
      {"device_assert_names_the_thread", device_assert_names_the_thread},
      {"missing_syncthreads_caught", missing_syncthreads_caught},
      {"race_caught_by_reversed_schedule", race_caught_by_reversed_schedule},
      {"unwritten_shared_reads_nan", unwritten_shared_reads_nan},
      {"divergent_barrier_caught", divergent_barrier_caught},
      {"barrier_after_exit_caught", barrier_after_exit_caught},
      {"shuffle_after_exit_caught", shuffle_after_exit_caught},
      {"mixed_intrinsics_caught", mixed_intrinsics_caught},
      {"mask_without_self_caught", mask_without_self_caught},
      {"deadlock_caught", deadlock_caught},
  };
  if (argc != 3 || (std::string(argv[2]) != "forward" && std::string(argv[2]) != "reversed")) {
    std::cerr << "usage: cudasim_selftest all|out_of_bounds_write|shared_out_of_bounds_write|<case> forward|reversed\n";
    return 2;
  }
  cudasim::set_schedule(std::string(argv[2]) == "reversed" ? cudasim::Schedule::kReversed : cudasim::Schedule::kForward);
  const std::string which = argv[1];
  if (which == "out_of_bounds_write" || which == "shared_out_of_bounds_write") {
    (which == "out_of_bounds_write" ? out_of_bounds_write : shared_out_of_bounds_write)();
    return 1;  // reached only without ASan: the case did not do its job
  }
  int failed = 0, run = 0;
  for (const auto& [name, fn] : cases) {
    if (which != "all" && which != name) continue;
    ++run;
    std::cout << "[ RUN  ] " << name << "\n";
    try {
      fn();
      std::cout << "[  OK  ] " << name << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "[ FAIL ] " << name << ": " << e.what() << "\n";
    }
  }
  if (run == 0) {
    std::cerr << "no case named " << which << "\n";
    return 2;
  }
  const auto s = cudasim::stats();
  std::cout << run - failed << " of " << run << " cases passed (" << s.launches << " launches, " << s.blocks
            << " blocks, " << s.threads << " threads, " << s.switches << " fiber switches)\n";
  return failed ? 1 : 0;
}
