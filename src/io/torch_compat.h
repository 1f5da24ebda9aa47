// The only place that knows which libtorch we are built against (Debian's 1.13 or the 2.x wheel).
#pragma once
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#define LLAVA_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace c10d {
class Backend;
class ProcessGroup;
}  // namespace c10d

namespace llava::compat {

// libtorch 2.x splits ProcessGroup (the front) from Backend (Gloo/NCCL); in 1.13 the backends are
// ProcessGroups themselves.
#if LLAVA_TORCH_AT_LEAST(2, 0)
using C10dBackend = c10d::Backend;
#else
using C10dBackend = c10d::ProcessGroup;
#endif

inline constexpr bool kHasSdpa = LLAVA_TORCH_AT_LEAST(2, 0);

// softmax(q k^T * scale + mask) v. q: [B,H,Tq,D], k/v: [B,H,Tk,D], mask: additive, broadcastable to
// [B,H,Tq,Tk] (or undefined). The softmax runs in fp32 like HF's eager attention.
inline torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale) {
#if LLAVA_TORCH_AT_LEAST(2, 1)
  // An undefined mask must reach SDPA as "no mask" (nullopt), not as an optional holding nothing.
  c10::optional<at::Tensor> attn_mask = mask.defined() ? c10::optional<at::Tensor>(mask) : c10::nullopt;
  return at::scaled_dot_product_attention(q, k, v, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
#else
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;
  if (mask.defined()) scores = scores + mask;
  auto probs = torch::softmax(scores.to(torch::kFloat32), -1).to(q.scalar_type());
  return torch::matmul(probs, v);
#endif
}

// A c10::Allocator written once for both versions: allocate() is const in 1.13 and not in 2.x, where
// copy_data() must be defined as well. Subclasses implement allocate_bytes().
struct AllocatorBase : c10::Allocator {
  virtual c10::DataPtr allocate_bytes(size_t n) = 0;
#if LLAVA_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t n) override { return allocate_bytes(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t n) const override { return const_cast<AllocatorBase*>(this)->allocate_bytes(n); }
#endif
};

// Calls `on_ready` each time autograd has accumulated a gradient into the leaf `param`'s .grad, as torch's
// DDP Reducer does: a post hook on the parameter's AccumulateGrad node. A leaf holds that node only
// weakly, so the handle keeps it alive (otherwise the next backward would make a new node without the
// hook); destroying the handle removes the hook. libtorch 1.13 hands the node out as a std::shared_ptr,
// 2.x as a c10::intrusive_ptr; the hook API itself is the same.
class GradAccumulatedHook {
 public:
  GradAccumulatedHook(const torch::Tensor& param, std::function<void()> on_ready)
      : node_(torch::autograd::impl::grad_accumulator(param)) {
    if (!node_) throw std::invalid_argument("GradAccumulatedHook: the tensor is not a leaf that requires grad");
    key_ = node_->add_post_hook(std::make_unique<Hook>(std::move(on_ready)));
  }
  ~GradAccumulatedHook() { node_->del_post_hook(key_); }
  GradAccumulatedHook(const GradAccumulatedHook&) = delete;
  GradAccumulatedHook& operator=(const GradAccumulatedHook&) = delete;

 private:
  struct Hook : torch::autograd::FunctionPostHook {
    explicit Hook(std::function<void()> fn) : fn(std::move(fn)) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list& /*inputs*/) override {
      fn();
      return outputs;
    }
    std::function<void()> fn;
  };
  decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>())) node_;
  uintptr_t key_ = 0;
};

}  // namespace llava::compat
