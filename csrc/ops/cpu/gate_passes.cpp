// CPU kernels of the gate passes (../gate_passes.h), and with them the CPU registration of
// nad::task_gate and nad::masked_conv2d (../gate_ops.h). Layouts: (N, C, S) rows per (n, c), or
// channels_last (N, S, C) rows per (n, s). Every sum runs in a fixed order, whatever the number
// of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../gate_ops.h"
#include "../gate_passes.h"
#include "../registration.h"

namespace nad {
namespace cpu {
namespace {

template <typename acc_t>
at::Tensor acc_copy(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// One row of the forward pass: y = g * act, act = relu(src + b). kSave, kRelu and __restrict__
// let the compiler vectorise the loop (a run-time test per element or possible aliasing kept it
// scalar). The gate multiplies the rounded activation, so y == g * act exactly as backward sees.
template <bool kSave, bool kRelu, typename scalar_t, typename acc_t, typename Gate, typename Bias>
inline void forward_row(const scalar_t* __restrict__ src, scalar_t* __restrict__ y,
                        scalar_t* __restrict__ act, int64_t len, Gate gate, Bias bias) {
  for (int64_t k = 0; k < len; ++k) {
    acc_t v = static_cast<acc_t>(src[k]) + bias(k);
    if (kRelu) v = v > acc_t(0) ? v : acc_t(0);
    const scalar_t a = static_cast<scalar_t>(v);
    if (kSave) act[k] = a;
    y[k] = static_cast<scalar_t>(gate(k) * static_cast<acc_t>(a));
  }
}

template <bool kSave, bool kRelu, typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* cp, const acc_t* gp, const acc_t* bp, const int64_t* ids,
                  scalar_t* yp, scalar_t* ap, int64_t N, int64_t C, int64_t S, bool inner) {
  // (N, C, S): a row per (n, c) with one gate and one bias; (N, S, C): a row per (n, s).
  const int64_t row = inner ? C : S, rows = N * (inner ? S : C);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / row), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* act = kSave ? ap + r * row : nullptr;
      if (inner) {
        const acc_t* g = gp + ids[r / S] * C;
        forward_row<kSave, kRelu, scalar_t, acc_t>(
            cp + r * row, yp + r * row, act, row, [g](int64_t c) { return g[c]; },
            [bp](int64_t c) { return bp[c]; });
      } else {
        const int64_t c = r % C;
        const acc_t g = gp[ids[r / C] * C + c], b = bp[c];
        forward_row<kSave, kRelu, scalar_t, acc_t>(
            cp + r * row, yp + r * row, act, row, [g](int64_t) { return g; }, [b](int64_t) { return b; });
      }
    }
  });
}

// grad_in = (act > 0 or no ReLU) ? grad_y * g : 0 over one row (written when kWrite); returns
// sum(grad_y * act). Eight partial sums (a fixed order, so results do not depend on the thread
// count) let the compiler vectorise the row.
template <bool kRelu, bool kWrite, typename scalar_t, typename acc_t>
inline acc_t backward_row(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ act,
                          scalar_t* __restrict__ grad_in, int64_t len, acc_t g) {
  constexpr int kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(gy[k + j]), a = static_cast<acc_t>(act[k + j]);
      if (kWrite) grad_in[k + j] = static_cast<scalar_t>(!kRelu || a > acc_t(0) ? d * g : acc_t(0));
      part[j] += d * a;
    }
  }
  for (; k < len; ++k) {
    const acc_t d = static_cast<acc_t>(gy[k]), a = static_cast<acc_t>(act[k]);
    if (kWrite) grad_in[k] = static_cast<scalar_t>(!kRelu || a > acc_t(0) ? d * g : acc_t(0));
    part[0] += d * a;
  }
  acc_t dot = 0;
  for (int j = 0; j < kLanes; ++j) dot += part[j];
  return dot;
}

// channels_last: one (n, s) position over the channels [c0, c1); gate sums accumulate per channel.
template <bool kRelu, bool kWrite, typename scalar_t, typename acc_t>
inline void backward_channels(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ act,
                              scalar_t* __restrict__ grad_in, const acc_t* __restrict__ g,
                              acc_t* __restrict__ sums, int64_t len) {
  for (int64_t c = 0; c < len; ++c) {
    const acc_t d = static_cast<acc_t>(gy[c]), a = static_cast<acc_t>(act[c]);
    if (kWrite) grad_in[c] = static_cast<scalar_t>(!kRelu || a > acc_t(0) ? d * g[c] : acc_t(0));
    sums[c] += d * a;
  }
}

template <bool kRelu, bool kWrite, typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* gyp, const scalar_t* ap, const acc_t* gp, const int64_t* ids,
                   scalar_t* gip, acc_t* sp, int64_t N, int64_t C, int64_t S, bool inner) {
  // Each thread owns a block of channels, hence whole columns of gate_sums: no atomics, and
  // each column is summed over n (and s) in order.
  at::parallel_for(0, C, inner ? 16 : 1, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = ids[n];
      if (inner) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (n * S + s) * C + c0;
          backward_channels<kRelu, kWrite>(gyp + i, ap + i, kWrite ? gip + i : nullptr,
                                           gp + t * C + c0, sp + t * C + c0, c1 - c0);
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = (n * C + c) * S;
          sp[t * C + c] += backward_row<kRelu, kWrite>(gyp + i, ap + i, kWrite ? gip + i : nullptr,
                                                       S, gp[t * C + c]);
        }
      }
    }
  });
}

}  // namespace

void gate_forward(const at::Tensor& src, const at::Tensor& bias, const at::Tensor& logits,
                  const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& y,
                  const at::Tensor& act) {
  const int64_t N = src.size(0), C = src.size(1), S = src.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gate_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gate = acc_copy<acc_t>(logits).sigmoid();
    const auto b = bias.defined() ? acc_copy<acc_t>(bias) : at::zeros({C}, gate.options());
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const scalar_t* cp = src.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* ap = act.defined() ? act.data_ptr<scalar_t>() : nullptr;
    if (ap && relu) forward_rows<true, true>(cp, gp, bp, ids, yp, ap, N, C, S, inner);
    else if (ap) forward_rows<true, false>(cp, gp, bp, ids, yp, ap, N, C, S, inner);
    else if (relu) forward_rows<false, true>(cp, gp, bp, ids, yp, ap, N, C, S, inner);
    else forward_rows<false, false>(cp, gp, bp, ids, yp, ap, N, C, S, inner);
  });
}

void gate_backward(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& grad_in,
                   const at::Tensor& gate_sums) {
  const int64_t N = act.size(0), C = act.size(1), S = act.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "gate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gate = acc_copy<acc_t>(logits).sigmoid();
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* ap = act.const_data_ptr<scalar_t>();
    scalar_t* gip = grad_in.defined() ? grad_in.data_ptr<scalar_t>() : nullptr;
    acc_t* sp = gate_sums.data_ptr<acc_t>();
    if (relu && gip) backward_rows<true, true>(gyp, ap, gp, ids, gip, sp, N, C, S, inner);
    else if (relu) backward_rows<true, false>(gyp, ap, gp, ids, gip, sp, N, C, S, inner);
    else if (gip) backward_rows<false, true>(gyp, ap, gp, ids, gip, sp, N, C, S, inner);
    else backward_rows<false, false>(gyp, ap, gp, ids, gip, sp, N, C, S, inner);
  });
}

}  // namespace cpu
}  // namespace nad

// nad::task_gate and nad::masked_conv2d on this backend: the host code around these passes.
NAD_LIBRARY_IMPL(CPU, m) {
  nad::GateOps<&nad::cpu::gate_forward, &nad::cpu::gate_backward>::register_kernels(m);
}
