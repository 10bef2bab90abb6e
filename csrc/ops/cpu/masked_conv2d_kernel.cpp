// CPU kernels of nad::masked_conv2d: the fused epilogue and the fused backward pass (the
// convolutions themselves are ATen's, see ../masked_conv2d.cpp). Layouts: (N, C, S) rows per
// (n, c), or channels_last (N, S, C) rows per (n, s).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../masked_conv2d.h"

namespace nad {
namespace cpu {
namespace {

template <typename acc_t>
at::Tensor acc_copy(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

void epilogue(const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& logits,
              const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& y,
              const at::Tensor& act) {
  const int64_t N = conv.size(0), C = conv.size(1), S = conv.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "masked_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gate = acc_copy<acc_t>(logits).sigmoid();
    const auto b = bias.defined() ? acc_copy<acc_t>(bias) : at::zeros({C}, gate.options());
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const scalar_t* cp = conv.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* ap = act.defined() ? act.data_ptr<scalar_t>() : nullptr;
    auto one = [&](int64_t i, int64_t n, int64_t c) {
      acc_t v = static_cast<acc_t>(cp[i]) + bp[c];
      if (relu && !(v > acc_t(0))) v = acc_t(0);
      const scalar_t a = static_cast<scalar_t>(v);
      if (ap) ap[i] = a;
      // Gate the rounded activation, so that y == g * act exactly as backward sees it.
      yp[i] = static_cast<scalar_t>(gp[ids[n] * C + c] * static_cast<acc_t>(a));
    };
    const int64_t row = inner ? C : S, rows = N * (inner ? S : C);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / row), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = inner ? r / S : r / C;
        if (inner)
          for (int64_t c = 0; c < C; ++c) one(r * C + c, n, c);
        else
          for (int64_t s = 0, c = r % C; s < S; ++s) one(r * S + s, n, c);
      }
    });
  });
}

void backward_pass(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& grad_pre,
                   const at::Tensor& gate_sums) {
  const int64_t N = act.size(0), C = act.size(1), S = act.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "masked_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gate = acc_copy<acc_t>(logits).sigmoid();
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* ap = act.const_data_ptr<scalar_t>();
    scalar_t* gpp = grad_pre.data_ptr<scalar_t>();
    acc_t* sp = gate_sums.data_ptr<acc_t>();
    // Each thread owns a block of channels, hence whole columns of gate_sums: no atomics.
    at::parallel_for(0, C, inner ? 16 : 1, [&](int64_t c0, int64_t c1) {
      auto one = [&](int64_t i, int64_t t, int64_t c, acc_t& dot) {
        const acc_t gy = static_cast<acc_t>(gyp[i]), a = static_cast<acc_t>(ap[i]);
        const bool open = !relu || a > acc_t(0);
        gpp[i] = static_cast<scalar_t>(open ? gy * gp[t * C + c] : acc_t(0));
        dot += gy * a;
      };
      for (int64_t n = 0; n < N; ++n) {
        const int64_t t = ids[n];
        if (inner) {
          for (int64_t s = 0; s < S; ++s)
            for (int64_t c = c0; c < c1; ++c) one((n * S + s) * C + c, t, c, sp[t * C + c]);
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            acc_t dot = 0;
            for (int64_t s = 0; s < S; ++s) one((n * C + c) * S + s, t, c, dot);
            sp[t * C + c] += dot;
          }
        }
      }
    });
  });
}

}  // namespace

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                         const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool relu) {
  return std::get<0>(masked_conv2d_forward_with(&epilogue, x, weight, bias, logits, task_ids, stride,
                                                padding, dilation, groups, relu, false));
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  return masked_conv2d_forward_with(&epilogue, x, weight, bias, logits, task_ids, stride, padding,
                                    dilation, groups, relu, true);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  return masked_conv2d_backward_with(&backward_pass, grad_y, x, weight, act, logits, task_ids,
                                     stride, padding, dilation, groups, relu, x_grad);
}

}  // namespace cpu
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CPU, m) {
  m.impl("masked_conv2d", &nad::cpu::masked_conv2d);
  m.impl("masked_conv2d_forward", &nad::cpu::masked_conv2d_forward);
  m.impl("masked_conv2d_backward", &nad::cpu::masked_conv2d_backward);
}
