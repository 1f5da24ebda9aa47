#include "distributed/buckets.h"

#include "io/error.h"

namespace llava::dist {

std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, const std::vector<torch::Dtype>& dtypes,
                                 int64_t cap_numel) {
  if (numels.size() != dtypes.size())
    fail("plan_buckets", std::to_string(numels.size()) + " numels but " + std::to_string(dtypes.size()) + " dtypes");
  if (cap_numel < 1) fail("plan_buckets", "bucket cap must be >= 1 element, got " + std::to_string(cap_numel));
  std::vector<Bucket> buckets;
  for (size_t i = 0; i < numels.size(); ++i) {
    bool fits = !buckets.empty() && dtypes[buckets.back().indices.back()] == dtypes[i] &&
                buckets.back().numel + numels[i] <= cap_numel;
    if (!fits) buckets.emplace_back();
    buckets.back().indices.push_back(i);
    buckets.back().numel += numels[i];
  }
  return buckets;
}

void allreduce_gradients(Communicator& comm, std::vector<torch::Tensor>& grads, Reduce op, int64_t cap_numel) {
  std::vector<int64_t> numels;
  std::vector<torch::Dtype> dtypes;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) fail("allreduce_gradients", "gradient #" + std::to_string(i) + " is undefined");
    numels.push_back(grads[i].numel());
    dtypes.push_back(grads[i].scalar_type());
  }
  if (comm.world_size() == 1) return;  // the mean (or sum) over one rank

  for (const auto& bucket : plan_buckets(numels, dtypes, cap_numel)) {
    std::vector<torch::Tensor> pieces;
    for (size_t i : bucket.indices) pieces.push_back(grads[i].reshape({-1}));
    auto flat = torch::cat(pieces);  // [bucket.numel]
    comm.allreduce(flat, op);
    int64_t offset = 0;
    for (size_t i : bucket.indices) {
      grads[i].copy_(flat.narrow(0, offset, numels[i]).view(grads[i].sizes()));
      offset += numels[i];
    }
  }
}

}  // namespace llava::dist
