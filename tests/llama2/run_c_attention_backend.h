// RunCAttentionBackend: a KvBackend for tests that stores every token's K/V in plain vectors and
// computes attention with llama2.c run.c's exact float arithmetic (scores divided by
// sqrtf(head_size), run.c's softmax, weighted sum in token order). With it the forward pass can
// be compared with run.c's logits without Headwise's kernels in the way, which separates errors
// of the model code from the (legitimately different) rounding of the attention kernels.
// Ignores policies: it always keeps the full context.
#ifndef HEADWISE_TESTS_LLAMA2_RUN_C_ATTENTION_BACKEND_H_
#define HEADWISE_TESTS_LLAMA2_RUN_C_ATTENTION_BACKEND_H_

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/llama2/kv_backend.h"
#include "clients/llama2/sampler.h"

namespace headwise::llama2::testing {

class RunCAttentionBackend : public KvBackend {
 public:
  absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout) override {
    layouts_[name] = layout;
    return absl::OkStatus();
  }
  absl::StatusOr<SequenceId> CreateSequence(const std::string& layout_name,
                                            const headwise::v1::PolicySpec&) override {
    auto it = layouts_.find(layout_name);
    if (it == layouts_.end()) return absl::NotFoundError(layout_name);
    const SequenceId id(0, ++next_id_);
    Sequence& s = sequences_[id];
    s.layout = it->second;
    s.k.resize(s.layout.num_layers);
    s.v.resize(s.layout.num_layers);
    return id;
  }
  absl::Status AppendAndAttend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                               absl::Span<const float> k, absl::Span<const float> v,
                               absl::Span<float> o, absl::Span<float> lse) override {
    auto it = sequences_.find(seq);
    if (it == sequences_.end()) return absl::NotFoundError("unknown sequence");
    Sequence& s = it->second;
    const ModelLayout& l = s.layout;
    const int head_size = l.head_dim, kv_dim = l.num_kv_heads * head_size;
    std::vector<float>& keys = s.k[layer.value()];
    std::vector<float>& values = s.v[layer.value()];
    keys.insert(keys.end(), k.begin(), k.end());
    values.insert(values.end(), v.begin(), v.end());
    const int tokens = static_cast<int>(keys.size()) / kv_dim;
    std::vector<float> att(tokens);
    for (int h = 0; h < l.num_q_heads; ++h) {
      const float* qh = q.data() + h * head_size;
      const int kv_offset = (h / l.group_size()) * head_size;
      for (int t = 0; t < tokens; ++t) {
        const float* kt = keys.data() + t * kv_dim + kv_offset;
        float score = 0.0f;
        for (int i = 0; i < head_size; ++i) score += qh[i] * kt[i];
        score /= std::sqrt(static_cast<float>(head_size));
        att[t] = score;
      }
      Softmax(absl::MakeSpan(att));
      float* oh = o.data() + h * head_size;
      for (int i = 0; i < head_size; ++i) oh[i] = 0.0f;
      for (int t = 0; t < tokens; ++t) {
        const float* vt = values.data() + t * kv_dim + kv_offset;
        for (int i = 0; i < head_size; ++i) oh[i] += att[t] * vt[i];
      }
      lse[h] = 0.0f;  // Not needed by the model.
    }
    return absl::OkStatus();
  }
  absl::Status ReleaseSequence(const SequenceId& seq) override {
    return sequences_.erase(seq) == 1 ? absl::OkStatus() : absl::NotFoundError("unknown sequence");
  }
  absl::StatusOr<std::string> DescribeStats(const SequenceId&) override {
    return absl::StrCat(sequences_.size(), " sequences");
  }

 private:
  struct Sequence {
    ModelLayout layout;
    std::vector<std::vector<float>> k, v;  // Per layer: [tokens][kv_dim].
  };
  std::map<std::string, ModelLayout> layouts_;
  std::map<SequenceId, Sequence> sequences_;
  uint64_t next_id_ = 0;
};

}  // namespace headwise::llama2::testing

#endif  // HEADWISE_TESTS_LLAMA2_RUN_C_ATTENTION_BACKEND_H_
