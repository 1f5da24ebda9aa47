// The only place that knows which libtorch we are built against (Debian's 1.13 or the 2.x wheel).
#pragma once
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <cstdint>
#include <cstring>
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

// LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) computed in fp32, cast back to x's dtype, then * weight in that
// dtype. libtorch >= 2.4 has at::rms_norm, one kernel instead of five element-wise passes (and their saved
// temporaries); forward and backward were checked bitwise equal to the composite on 2.13 for fp32 and bf16.
// For other dtypes the weight is applied afterwards, so the cast-then-scale rounding stays HF's.
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
#if LLAVA_TORCH_AT_LEAST(2, 4)
  if (x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32)
    return at::rms_norm(x, {weight.size(0)}, weight, eps);
  return weight * at::rms_norm(x, {weight.size(0)}, c10::nullopt, eps);
#else
  auto x32 = x.to(torch::kFloat32);
  auto normed = x32 * torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
#endif
}

// AdamW over lists of same-dtype contiguous tensors in one fused kernel (libtorch >= 2.4: torch's
// `fused=True` path), or nothing (returns false) where the version has none. `steps` are this update's
// step counts (already incremented), as torch passes state_steps.
inline bool fused_adamw_step(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                             std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                             const std::vector<int64_t>& steps, double lr, double beta1, double beta2,
                             double weight_decay, double eps) {
#if LLAVA_TORCH_AT_LEAST(2, 4)
  std::vector<torch::Tensor> step_tensors;
  for (auto s : steps) step_tensors.push_back(torch::scalar_tensor(static_cast<double>(s), torch::kFloat32));
  at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, step_tensors, lr, beta1, beta2,
                    weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  return true;
#else
  return false;
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

// A torch.save zip writer over a write callback. libtorch >= 2.4 can leave out the CRC32 of each record
// (what torch.save does after torch.serialization.set_crc32_options(False)): it costs a pass over every
// byte, and neither torch.load (weights_only or not) nor PyTorchStreamReader checks it (the CRC fields
// are 0; `unzip -t` would complain). libtorch 1.13 always computes it.
inline constexpr bool kStreamWriterSkipsCrc32 = LLAVA_TORCH_AT_LEAST(2, 4);

inline std::unique_ptr<caffe2::serialize::PyTorchStreamWriter> stream_writer(
    const std::function<size_t(const void*, size_t)>& write) {
#if LLAVA_TORCH_AT_LEAST(2, 4)
  return std::make_unique<caffe2::serialize::PyTorchStreamWriter>(write, /*compute_crc32=*/false);
#else
  return std::make_unique<caffe2::serialize::PyTorchStreamWriter>(write);
#endif
}

// The size of record `name` and, when it is `n` bytes, the record itself read into `dst`. libtorch >= 2.4
// reads it straight into dst (no intermediate buffer); 1.13 can only hand out a fresh buffer, which is
// then copied once more. Returns the record's size (nothing is copied when it is not n).
inline size_t read_record_into(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name, void* dst,
                               size_t n) {
#if LLAVA_TORCH_AT_LEAST(2, 4)
  const size_t size = reader.getRecordSize(name);
  if (size == n && n > 0) reader.getRecord(name, dst, n);
  return size;
#else
  auto [data, size] = reader.getRecord(name);
  if (size == n && n > 0) std::memcpy(dst, data.get(), n);
  return size;
#endif
}

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
