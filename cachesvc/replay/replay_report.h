// Renderings of a RequestReplayReport (request_replay.h): a terminal table, JSON and CSV. Column
// meanings: docs/replay.md.
#ifndef HEADWISE_CACHESVC_REPLAY_REPLAY_REPORT_H_
#define HEADWISE_CACHESVC_REPLAY_REPLAY_REPORT_H_

#include <string>

#include "cachesvc/replay/request_replay.h"

namespace headwise {

// The trace summary, then one row per policy and capacity (for traces without block ids, the
// summary and a line saying that no reuse can be computed).
std::string FormatReplayTable(const RequestReplayReport& report);

// One JSON object: "source", "model" (token_kv_bytes, model_params, device), "summary" and
// "results" (one object per row, the PolicyResult fields plus hit_ratio and prefix_hit_ratio).
std::string ReplayReportJson(const RequestReplayReport& report);

// A header line and one line per row (the same fields as the JSON rows); no summary.
std::string ReplayReportCsv(const RequestReplayReport& report);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REPLAY_REPLAY_REPORT_H_
