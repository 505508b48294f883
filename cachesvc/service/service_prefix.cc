// HeadwiseService: prefix reuse (docs/scale-out.md). Token ids arrive with appends and are
// recorded per sequence (SequenceTokens); CreateSequence with prefix_token_ids starts from the
// longest cached prefix (PrefixCache::Start); Release offers the sequence's full blocks to the
// cache (PrefixCache::Publish). Blocks are hashed under the tenant's scope (its share group or
// itself), the tenant's layout name (the model) and the layout.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/headwise_service.h"

namespace headwise {

std::vector<BlockHash> HeadwiseService::PrefixHashes(const Tenant& tenant,
                                                     const std::string& layout_name,
                                                     const ModelLayout& layout,
                                                     absl::Span<const int32_t> tokens) const {
  PrefixIdentity identity;
  auto it = options_.prefix_scopes.find(tenant.name);
  identity.scope = it != options_.prefix_scopes.end() ? it->second : "t:" + tenant.name;
  identity.model = layout_name;
  identity.layout = layout;
  identity.block_tokens = int64_t{options_.prefix_block_pages} * layout.page_tokens;
  return ChainBlockHashes(PrefixSeed(identity), tokens, identity.block_tokens);
}

absl::StatusOr<PrefixStart> HeadwiseService::StartSequence(
    const Tenant& tenant, const headwise::v1::CreateSequenceRequest& request,
    const ModelLayout& layout) {
  const std::string engine_layout = EngineLayoutName(tenant.name, request.layout_name());
  const auto& ids = request.prefix_token_ids();
  if (std::any_of(ids.begin(), ids.end(), [](int32_t t) { return t < 0; })) {
    return absl::InvalidArgumentError("prefix_token_ids holds a negative id");
  }
  if (options_.prefix_cache == nullptr || request.durable() || ids.empty()) {
    PrefixStart plain;
    ASSIGN_OR_RETURN(plain.id, engine_->CreateSequence(engine_layout, request.policy()));
    return plain;
  }
  const std::vector<BlockHash> hashes =
      PrefixHashes(tenant, request.layout_name(), layout, absl::MakeConstSpan(ids));
  const int64_t block_tokens = int64_t{options_.prefix_block_pages} * layout.page_tokens;
  PrefixRequest prefix{engine_layout,
                       request.policy(),
                       AppendTier(request.policy()),
                       block_tokens,
                       block_tokens * layout.token_bytes(),
                       hashes};
  return options_.prefix_cache->Start(prefix);
}

absl::StatusOr<int64_t> HeadwiseService::CheckTokenIds(SequenceEntry& entry, int layer,
                                                       absl::Span<const int32_t> ids,
                                                       int64_t num_tokens) {
  if (ids.empty()) return -1;
  ASSIGN_OR_RETURN(const SequenceStats stats,
                   engine_->GetSequenceStats(entry.engine_id, StatsDetail::kUsage));
  const int64_t start = layer < 0 ? stats.length : stats.layer_lengths.at(layer);
  RETURN_IF_ERROR(entry.tokens.Check(start, ids, num_tokens));
  return start;
}

void HeadwiseService::PublishPrefix(SequenceEntry& entry) {
  if (options_.prefix_cache == nullptr || entry.tokens.size() == 0) return;
  absl::StatusOr<SequenceStats> stats =
      engine_->GetSequenceStats(entry.engine_id, StatsDetail::kUsage);
  if (!stats.ok()) return;
  const auto known = std::min<int64_t>(stats->length, entry.tokens.size());
  const std::vector<BlockHash> hashes = PrefixHashes(*entry.tenant, entry.layout_name, entry.layout,
                                                     entry.tokens.ids().subspan(0, known));
  options_.prefix_cache->Publish(entry.engine_id,
                                 int64_t{options_.prefix_block_pages} * entry.layout.page_tokens,
                                 hashes, entry.prefix_touched);
}

}  // namespace headwise
