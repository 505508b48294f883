// Paths of the stories260K model and its llama2.c reference outputs in the shared data folder,
// and loaders for the reference files.
#ifndef HEADWISE_TESTS_LLAMA2_STORIES260K_H_
#define HEADWISE_TESTS_LLAMA2_STORIES260K_H_

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace headwise::llama2::testing {

inline std::string ModelDir() {
  return std::string(HEADWISE_SHARED_DIR) + "/data/models/stories260K";
}
inline std::string CheckpointPath() { return ModelDir() + "/stories260K.bin"; }
inline std::string TokenizerPath() { return ModelDir() + "/tok512.bin"; }
inline std::string ReferencePath(const std::string& name) {
  return ModelDir() + "/reference/" + name;
}
inline bool HaveModel() {
  return std::filesystem::exists(CheckpointPath()) && std::filesystem::exists(TokenizerPath()) &&
         std::filesystem::exists(ReferencePath("greedy_empty_tokens.tsv"));
}

// One row of greedy_empty_tokens.tsv: position, input token, next token.
struct ReferenceStep {
  int pos;
  int input;
  int next;
};
inline std::vector<ReferenceStep> LoadReferenceSteps() {
  std::vector<ReferenceStep> steps;
  std::ifstream in(ReferencePath("greedy_empty_tokens.tsv"));
  ReferenceStep s;
  while (in >> s.pos >> s.input >> s.next) steps.push_back(s);
  return steps;
}

// greedy_empty_logits_pos0-3.tsv: one row per position: position, then the logits.
inline std::vector<std::vector<double>> LoadReferenceLogits() {
  std::vector<std::vector<double>> rows;
  std::ifstream in(ReferencePath("greedy_empty_logits_pos0-3.tsv"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    double pos;
    fields >> pos;
    std::vector<double> row;
    double value;
    while (fields >> value) row.push_back(value);
    rows.push_back(std::move(row));
  }
  return rows;
}

inline std::string LoadReferenceText() {
  std::ifstream in(ReferencePath("greedy_empty_text.txt"), std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace headwise::llama2::testing

#define HEADWISE_SKIP_WITHOUT_STORIES260K()                                                  \
  do {                                                                                       \
    if (!::headwise::llama2::testing::HaveModel()) {                                         \
      GTEST_SKIP() << "shared data not found at " << ::headwise::llama2::testing::ModelDir() \
                   << " (../shared/data)";                                                   \
    }                                                                                        \
  } while (false)

#endif  // HEADWISE_TESTS_LLAMA2_STORIES260K_H_
