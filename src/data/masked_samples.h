// Samples LLaVA's "tokenization mismatch" rule masks whole (preprocess_v1: the template's rounds,
// tokenized one by one, do not add up to the tokenized conversation; see conversation.h). We keep the
// rule, but such a sample trains nothing, so it is never silent:
//   - before anything is written, scan() tokenizes the records (all of them up to kScanLimit, else
//     kScanLimit spread evenly over the data set; no images) and refuses the data set with one Error naming
//     the data file(s) when more than half of the records checked are masked (a tokenizer that does not
//     fit the template, not a few odd records);
//   - a warning per masked record, naming its file, index and id, once per record: the first
//     kMaxWarnings, then one line saying that further ones are only counted;
//   - the count of masked samples drawn, for the run's summary line.
#pragma once
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"

namespace llava::data {

class MaskedSampleReport {
 public:
  static constexpr size_t kScanLimit = 2000;
  static constexpr size_t kMaxWarnings = 10;

  explicit MaskedSampleReport(const LlavaDataset& dataset) : dataset_(dataset) {}

  // Warning lines for the masked records among those checked; Error (naming the data files) when more
  // than half of them are masked, or when a record's conversation does not fit the template.
  std::vector<std::string> scan();

  // Counts the batch's masked rows; warning lines for the records not reported yet.
  std::vector<std::string> note(const Batch& batch);

  int64_t masked_drawn() const { return masked_drawn_; }

  // "tokenization mismatch: N of M samples drawn ... (K records of the data set)", or "" when none.
  // `masked_drawn` / `drawn` may be totals over ranks.
  std::string summary(int64_t masked_drawn, int64_t drawn) const;

 private:
  std::vector<std::string> warn(size_t index, const TokenizationMismatch& mismatch);

  const LlavaDataset& dataset_;
  std::set<size_t> reported_;  // records warned about (or counted past the warning limit)
  size_t warnings_ = 0;
  int64_t masked_drawn_ = 0;
};

}  // namespace llava::data
