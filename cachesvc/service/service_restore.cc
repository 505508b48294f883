// HeadwiseService::Restore: re-creates the durable sequences from the log at start.
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/headwise_service.h"
#include "spdlog/spdlog.h"

namespace headwise {
namespace {

// What a replay leaves behind: the sequence, its next op index, and per layer the step id of
// the last append since the last truncate (0: none) with its token count.
struct Replayed {
  std::optional<SequenceId> id;
  uint32_t next_op = 0;
  size_t num_ops = 0;
  int64_t tokens = 0;
  std::vector<uint64_t> last_step_id;
  std::vector<int> last_step_tokens;
};

absl::Status ReplayOps(Engine& engine, DurableLog& log, const std::string& handle,
                       const ModelLayout& layout, Replayed& out) {
  ASSIGN_OR_RETURN(std::vector<DurableLog::Op> ops, log.LoadOps(handle));
  out.num_ops = ops.size();
  out.last_step_id.assign(static_cast<size_t>(layout.num_layers), 0);
  out.last_step_tokens.assign(static_cast<size_t>(layout.num_layers), 0);
  std::vector<std::byte> k, v;
  for (const DurableLog::Op& op : ops) {
    const auto& record = op.record;
    absl::Status status;
    if (record.kind() == headwise::v1::DurableOpRecord::APPEND) {
      status = log.ReadAppend(handle, op, &k, &v);
      if (status.ok() && record.decisions_logged()) {
        // The policy decided from queries: apply what it decided then, not a new decision.
        LayerDrops drops;
        drops.positions.resize(layout.num_kv_heads);
        for (const headwise::v1::HeadDrops& d : record.dropped()) {
          if (d.kv_head() < 0 || d.kv_head() >= layout.num_kv_heads) {
            status = absl::DataLossError(absl::StrCat("dropped kv head ", d.kv_head()));
            break;
          }
          drops.positions[d.kv_head()].assign(d.positions().begin(), d.positions().end());
        }
        if (status.ok()) {
          status = engine.AppendReplay(*out.id, LayerId(record.layer()), k, v, record.num_tokens(),
                                       layout.dtype, drops);
        }
      } else if (status.ok()) {
        status = engine.Append(*out.id, LayerId(record.layer()), k, v, record.num_tokens(),
                               layout.dtype);
      }
      if (status.ok()) {
        out.last_step_id.at(record.layer()) = record.step_id();
        out.last_step_tokens.at(record.layer()) = record.num_tokens();
      }
      out.tokens += record.num_tokens();
    } else if (record.kind() == headwise::v1::DurableOpRecord::TRUNCATE) {
      status = engine.Truncate(*out.id, record.truncate_length());
      std::fill(out.last_step_id.begin(), out.last_step_id.end(), 0);
    } else {
      status = absl::DataLossError("unknown op kind");
    }
    if (!status.ok()) {
      return absl::Status(status.code(),
                          absl::StrCat("op ", op.index, ": ", std::string(status.message())));
    }
    out.next_op = op.index + 1;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<int> HeadwiseService::Restore() {
  DurableLog* log = options_.durable_log;
  if (log == nullptr) return 0;
  ASSIGN_OR_RETURN(auto layouts, log->LoadLayouts());
  for (const auto& record : layouts) {
    const Tenant* tenant = options_.tenants->Find(record.tenant());
    if (tenant == nullptr) {
      spdlog::warn("restore: layout '{}' of unknown tenant '{}' skipped", record.name(),
                   record.tenant());
      continue;
    }
    headwise::v1::RegisterLayoutRequest request;
    request.set_name(record.name());
    *request.mutable_layout() = record.layout();
    absl::Status status = DoRegisterLayout(*tenant, request);
    if (!status.ok()) {
      spdlog::error("restore: layout '{}' of tenant '{}': {}", record.name(), record.tenant(),
                    std::string(status.message()));
    }
  }
  ASSIGN_OR_RETURN(auto sequences, log->LoadSequences());
  int restored = 0;
  for (const auto& record : sequences) {
    if (RestoreSequence(record)) ++restored;
  }
  return restored;
}

bool HeadwiseService::RestoreSequence(const headwise::v1::DurableSequenceRecord& record) {
  const absl::Time start = absl::Now();
  const Tenant* tenant = options_.tenants->Find(record.tenant());
  if (tenant == nullptr) {
    spdlog::error("restore: sequence {} of unknown tenant '{}' skipped (kept on disk)",
                  record.handle(), record.tenant());
    return false;
  }
  absl::StatusOr<ModelLayout> layout = LayoutFromProto(record.layout());
  Replayed replayed;
  auto replay = [&]() -> absl::Status {
    RETURN_IF_ERROR(layout.status());
    const std::string engine_layout = EngineLayoutName(tenant->name, record.layout_name());
    RETURN_IF_ERROR(engine_->RegisterLayout(engine_layout, *layout));
    ASSIGN_OR_RETURN(replayed.id, engine_->CreateSequence(engine_layout, record.policy()));
    return ReplayOps(*engine_, *options_.durable_log, record.handle(), *layout, replayed);
  };
  if (absl::Status status = replay(); !status.ok()) {
    if (replayed.id.has_value()) engine_->Release(*replayed.id).IgnoreError();
    spdlog::error("restore: sequence {} of tenant '{}' not restored (kept on disk): {}",
                  record.handle(), tenant->name, std::string(status.message()));
    return false;
  }
  {
    TenantState& state = StateOf(*tenant);
    absl::MutexLock lock(&state.mu);
    ++state.sequences;
    state.layouts.try_emplace(record.layout_name(), *layout);
  }
  auto entry = InsertSequence(*tenant, record.handle(), *replayed.id, record.layout_name(), *layout,
                              /*durable=*/true, AppendTier(record.policy()));
  {
    absl::MutexLock lock(&entry->mu);
    entry->next_op = replayed.next_op;
    absl::StatusOr<SequenceStats> stats =
        engine_->GetSequenceStats(entry->engine_id, StatsDetail::kUsage);
    for (int layer = 0; stats.ok() && layer < layout->num_layers; ++layer) {
      if (replayed.last_step_id[layer] == 0) continue;
      // The layer's last op is that append, so its length now is the length right after it.
      entry->steps.Record(layer, replayed.last_step_id[layer], StepKind::kRestored,
                          replayed.last_step_tokens[layer], stats->layer_lengths.at(layer));
    }
  }
  spdlog::info("restore: sequence {} tenant={} ops={} appended_tokens={} in {}", record.handle(),
               tenant->name, replayed.num_ops, replayed.tokens,
               absl::FormatDuration(absl::Now() - start));
  return true;
}

}  // namespace headwise
