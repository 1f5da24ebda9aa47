// Gradient buckets for data parallelism: consecutive gradients of one dtype packed into flat buffers of
// about `cap` elements, so the all-reduce runs on a few large tensors instead of many small ones.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "distributed/communicator.h"

namespace llava::dist {

struct Bucket {
  std::vector<size_t> indices;  // into the gradient list, in order
  int64_t numel = 0;
};

// Greedy, in order: a bucket is closed when adding the next tensor would pass cap_numel or the dtype
// changes; a tensor larger than the cap gets a bucket of its own. Every index appears exactly once.
std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, const std::vector<torch::Dtype>& dtypes,
                                 int64_t cap_numel);

// All-reduces (sums or averages) every gradient over the ranks, bucket by bucket, in place. Every rank
// ends with bitwise-identical gradients. Gradients must be defined (llava::Error names the index otherwise).
void allreduce_gradients(Communicator& comm, std::vector<torch::Tensor>& grads, Reduce op,
                         int64_t cap_numel = 25 << 20);

}  // namespace llava::dist
