#include "data/masked_samples.h"

#include <map>
#include <nlohmann/json.hpp>

#include "io/error.h"

namespace llava::data {
namespace {

// The data file of a record: its `where` is "FILE: record N" or "FILE: line N".
std::string file_of(const Record& r) {
  const size_t colon = r.where.rfind(": ");
  return colon == std::string::npos ? r.where : r.where.substr(0, colon);
}

std::string describe(const Record& r, size_t index, const TokenizationMismatch& m) {
  return r.where + " (id " + nlohmann::json(r.id).dump() + ", sample " + std::to_string(index) +
         "): tokenization mismatch: the template's rounds account for " + std::to_string(m.rounds_length) +
         " tokens, the conversation has " + std::to_string(m.total_length);
}

// Which records the scan checks: all of a small data set, else `limit` spread evenly over it.
std::vector<size_t> records_to_check(size_t size, size_t limit) {
  std::vector<size_t> out;
  if (size <= limit) {
    for (size_t i = 0; i < size; ++i) out.push_back(i);
  } else {
    for (size_t k = 0; k < limit; ++k) out.push_back(k * size / limit);
  }
  return out;
}

}  // namespace

std::vector<std::string> MaskedSampleReport::warn(size_t index, const TokenizationMismatch& mismatch) {
  if (!reported_.insert(index).second) return {};
  if (warnings_ > kMaxWarnings) return {};
  if (warnings_++ == kMaxWarnings)
    return {"warning: more samples are masked by the tokenization-mismatch rule; they are counted, not named"};
  return {"warning: " + describe(dataset_.record(index), index, mismatch) +
          "; LLaVA masks the whole sample, it trains nothing"};
}

std::vector<std::string> MaskedSampleReport::scan() {
  // Only vicuna_v1 has the rule: the other templates mask by turns, never a whole sample.
  if (dataset_.settings().conversation != Template::vicuna_v1) return {};
  const auto checked = records_to_check(dataset_.size(), kScanLimit);
  std::vector<std::pair<size_t, TokenizationMismatch>> masked;
  for (size_t i : checked)
    if (auto m = dataset_.check_tokenization(i)) masked.push_back({i, *m});
  if (masked.size() * 2 > checked.size()) {
    std::map<std::string, size_t> by_file;  // in data_path order would be nicer; sorted is deterministic
    for (auto& [i, m] : masked) ++by_file[file_of(dataset_.record(i))];
    std::string files;
    for (auto& [file, n] : by_file) files += (files.empty() ? "" : ", ") + file + " (" + std::to_string(n) + ")";
    const auto& [first, m] = masked.front();
    throw Error(files + ": " + std::to_string(masked.size()) + " of the " + std::to_string(checked.size()) +
                " records checked" + (checked.size() < dataset_.size() ? " (spread over the data set)" : "") +
                " are masked whole by LLaVA's tokenization-mismatch rule (template vicuna_v1; tokenizer " +
                (dataset_.tokenizer().legacy() ? "legacy" : "non-legacy") + ", add_bos_token " +
                (dataset_.tokenizer().add_bos() ? "true" : "false") +
                "), so they would train nothing (their rounds do not add up to their tokenization: a tokenizer that "
                "does not fit the template, or conversations without answers). First: " +
                describe(dataset_.record(first), first, m));
  }
  std::vector<std::string> lines;
  for (auto& [i, m] : masked)
    for (auto& line : warn(i, m)) lines.push_back(line);
  return lines;
}

std::vector<std::string> MaskedSampleReport::note(const Batch& batch) {
  std::vector<std::string> lines;
  for (auto& [index, m] : batch.mismatched) {
    ++masked_drawn_;
    for (auto& line : warn(static_cast<size_t>(index), m)) lines.push_back(line);
  }
  return lines;
}

std::string MaskedSampleReport::summary(int64_t masked_drawn, int64_t drawn) const {
  if (masked_drawn == 0 && reported_.empty()) return "";
  return "tokenization mismatch: " + std::to_string(masked_drawn) + " of " + std::to_string(drawn) +
         " samples drawn were masked whole and trained nothing (" + std::to_string(reported_.size()) +
         " distinct records of " + std::to_string(dataset_.size()) + " seen masked)";
}

}  // namespace llava::data
