#pragma once
// The two elementwise passes around a task-conditional channel gate, shared by nad::task_gate
// and nad::masked_conv2d (task_gate is masked_conv2d's epilogue without bias or ReLU, applied to
// x instead of a convolution's output). g = sigmoid(logits[task_ids[n], c]).
//
//   forward:  act = relu?(src + bias);  y = g * act           (act written when defined)
//   backward: grad_in = grad_y * g, 0 where relu and act <= 0  (written when grad_in is defined)
//             gate_sums[t, c] += sum over the samples n of task t and over space of grad_y * act
//
// Every tensor is in one layout: (N, C, S) contiguous, or channels_last (N, S, C) when
// `channels_inner`. gate_sums (T, C) is zero-initialised in the accumulation dtype (float32,
// float64 for float64 inputs); the logits gradient is gate_sums * g (1 - g).
//
// Determinism: the CPU passes always sum in a fixed order (bit-identical across runs and thread
// counts). The CUDA backward pass adds per-block sums with float atomics by default (fast; the
// last bits vary from run to run); under torch.use_deterministic_algorithms(True) it writes
// per-block partial sums and adds them in a fixed order in a second pass instead.
#include <ATen/ATen.h>

namespace nad {

// The layout of the outputs of both ops (and of the tensors the passes see): channels_last when
// x is 4-D, channels_last and not also contiguous, else contiguous. The fakes in nad_ext/ops/
// (_layout.py) use the same rule.
inline at::MemoryFormat gate_format(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// forward: bias may be undefined (no bias), act undefined (not saved).
using GateForwardPass = void (*)(const at::Tensor& src, const at::Tensor& bias,
                                 const at::Tensor& logits, const at::Tensor& task_ids, bool relu,
                                 bool channels_inner, const at::Tensor& y, const at::Tensor& act);
// backward: grad_in may be undefined (the input needs no gradient: only the sums are computed).
using GateBackwardPass = void (*)(const at::Tensor& grad_y, const at::Tensor& act,
                                  const at::Tensor& logits, const at::Tensor& task_ids, bool relu,
                                  bool channels_inner, const at::Tensor& grad_in,
                                  const at::Tensor& gate_sums);

namespace cpu {
void gate_forward(const at::Tensor& src, const at::Tensor& bias, const at::Tensor& logits,
                  const at::Tensor& task_ids, bool relu, bool channels_inner, const at::Tensor& y,
                  const at::Tensor& act);
void gate_backward(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool channels_inner,
                   const at::Tensor& grad_in, const at::Tensor& gate_sums);
}  // namespace cpu

namespace cuda {
void gate_forward(const at::Tensor& src, const at::Tensor& bias, const at::Tensor& logits,
                  const at::Tensor& task_ids, bool relu, bool channels_inner, const at::Tensor& y,
                  const at::Tensor& act);
void gate_backward(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool channels_inner,
                   const at::Tensor& grad_in, const at::Tensor& gate_sums);
}  // namespace cuda

}  // namespace nad
