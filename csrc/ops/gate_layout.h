#pragma once
// The one layout rule of the gate ops (nad::task_gate, nad::gate_mse, nad::masked_conv2d):
// which memory order their kernels read, and in which one their outputs are made. The fakes in
// nad_ext/ops/_layout.py follow the same rule (a fake must give the real op's strides exactly,
// or torch.compile traces a layout that the compiled code then does not get).
//
// An (N, C, *spatial) tensor (at least one spatial dim) is "channels innermost" when it is
// stored as a dense (N, *spatial, C) tensor (channel stride 1, the spatial dims dense with
// stride C and up) and is not also contiguous: the (N, C, L) view x.movedim(2, 1) of (N, L, C)
// tokens, strides (L*C, 1, C); the (N, C, H, W) view of an NHWC map, i.e. 4-D channels_last;
// 5-D channels_last_3d. Such tensors are read in place by the passes' channels-innermost path
// (rows of C channels per position), and outputs come back in the same layout. Everything else
// is read as contiguous (N, C, S): contiguous tensors in place, other layouts copied first.
// Only the host-side dispatch code includes this file (not the .cu kernels).
#include <ATen/ATen.h>

#include <vector>

namespace nad {

inline bool channels_inner(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// x in the gate layout `inner`: x itself when it is in it already (no copy), else a copy.
inline at::Tensor in_gate_layout(const at::Tensor& x, bool inner) {
  return inner ? x.movedim(1, -1).contiguous().movedim(-1, 1) : x.contiguous();
}

// A fresh tensor of `sizes` in the gate layout `inner`: contiguous, or the strides of a
// contiguous (N, *spatial, C) tensor seen as (N, C, *spatial) (for 4-D those of channels_last;
// inner tensors have no zero-sized dims, since empty tensors count as contiguous).
inline at::Tensor empty_in_gate_layout(at::IntArrayRef sizes, const at::TensorOptions& options, bool inner) {
  if (!inner) return at::empty(sizes, options);
  const int64_t d = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(d);
  int64_t running = sizes[1];
  strides[1] = 1;
  for (int64_t k = d - 1; k >= 2; --k) {
    strides[k] = running;
    running *= sizes[k];
  }
  strides[0] = running;
  return at::empty_strided(sizes, strides, options);
}

// The rule as a memory format, for the 4-D tensors of nad::masked_conv2d.
inline at::MemoryFormat gate_format(const at::Tensor& x) {
  return x.dim() == 4 && channels_inner(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace nad
