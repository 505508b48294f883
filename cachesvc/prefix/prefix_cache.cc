#include "cachesvc/prefix/prefix_cache.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "spdlog/spdlog.h"

namespace headwise {

absl::StatusOr<std::unique_ptr<PrefixCache>> PrefixCache::Create(
    const PrefixCacheOptions& options) {
  if (options.engine == nullptr) return absl::InvalidArgumentError("prefix cache needs an engine");
  if (BlockCachePolicyIsOffline(options.policy)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy '", options.policy, "' needs the future; use an online policy"));
  }
  RETURN_IF_ERROR(MakeBlockCache(options.policy, 1).status());
  return std::unique_ptr<PrefixCache>(new PrefixCache(options));
}

PrefixCache::~PrefixCache() {
  absl::MutexLock lock(&mu_);
  for (auto& [key, part] : parts_) {
    for (auto& [id, entry] : part->entries) Unpin(entry.pin);
  }
}

void PrefixCache::Unpin(BlockPagesId pin) {
  // NOT_FOUND cannot happen for a pin this cache owns; nothing else to do either way.
  options_.engine->UnpinBlock(pin).IgnoreError();
}

PrefixCache::Part& PrefixCache::PartFor(Tier tier, int64_t block_bytes) {
  std::unique_ptr<Part>& part = parts_[{static_cast<int>(tier), block_bytes}];
  if (part == nullptr) {
    part = std::make_unique<Part>();
    part->tier = tier;
    part->block_bytes = block_bytes;
    const uint64_t budget =
        tier == Tier::kDevice ? options_.device_budget_bytes : options_.host_budget_bytes;
    const auto capacity = static_cast<int64_t>(budget / static_cast<uint64_t>(block_bytes));
    if (tier != Tier::kDisk && capacity >= 1) {
      part->policy = *MakeBlockCache(options_.policy, capacity);  // Validated by Create.
    }
  }
  return *part;
}

const PrefixCache::Entry* PrefixCache::Find(const Part& part, const BlockHash& hash) {
  auto it = part.entries.find(hash.lo);
  return it != part.entries.end() && it->second.hash == hash ? &it->second : nullptr;
}

bool PrefixCache::Insert(Part& part, const BlockHash& hash, const PinnedBlock& pin) {
  // A different block under the same 64-bit id (a truncated-hash collision) keeps its place.
  if (part.policy == nullptr || part.entries.contains(hash.lo)) {
    Unpin(pin.id);
    return false;
  }
  std::vector<BlockId> evicted;
  const bool admitted = part.policy->Insert(hash.lo, &evicted);
  PrefixTierStats& t = stats_.tiers[static_cast<int>(part.tier)];
  for (const BlockId id : evicted) {
    auto it = part.entries.find(id);
    Unpin(it->second.pin);
    part.entries.erase(it);
    ++t.evicted_blocks;
    --t.resident_blocks;
    t.resident_bytes -= static_cast<uint64_t>(part.block_bytes);
  }
  if (!admitted) {
    Unpin(pin.id);
    return false;
  }
  part.entries[hash.lo] = Entry{hash, pin.id, pin.tokens};
  ++t.inserted_blocks;
  ++t.resident_blocks;
  t.resident_bytes += static_cast<uint64_t>(part.block_bytes);
  return true;
}

std::vector<PinnedBlock> PrefixCache::FetchRemote(const PrefixRequest& request, size_t from) {
  std::vector<PinnedBlock> pins;
  for (size_t i = from; i < request.hashes.size(); ++i) {
    absl::StatusOr<std::string> payload = options_.remote->Get(request.hashes[i]);
    if (!payload.ok()) break;
    const auto first = static_cast<int64_t>(i) * request.block_tokens;
    absl::StatusOr<PinnedBlock> pin = options_.engine->ImportBlock(
        request.engine_layout, request.tier, first, request.block_tokens,
        absl::MakeSpan(reinterpret_cast<const std::byte*>(payload->data()), payload->size()));
    if (!pin.ok()) {
      ++stats_.import_failures;
      spdlog::warn("prefix cache: remote block {} not imported: {}", request.hashes[i].ToHex(),
                   std::string(pin.status().message()));
      break;
    }
    pins.push_back(*pin);
  }
  return pins;
}

absl::StatusOr<PrefixStart> PrefixCache::Start(const PrefixRequest& request) {
  absl::MutexLock lock(&mu_);
  Part& part = PartFor(request.tier, request.block_bytes);
  if (!request.hashes.empty()) ++stats_.lookups;
  std::vector<BlockPagesId> blocks;
  for (const BlockHash& hash : request.hashes) {
    const Entry* entry = Find(part, hash);
    if (entry == nullptr) break;
    part.policy->Touch(hash.lo);
    blocks.push_back(entry->pin);
  }
  const size_t local = blocks.size();
  std::vector<PinnedBlock> fetched;
  if (options_.remote != nullptr && local < request.hashes.size()) {
    fetched = FetchRemote(request, local);
    for (const PinnedBlock& pin : fetched) blocks.push_back(pin.id);
  }
  absl::StatusOr<SequenceId> id =
      blocks.empty()
          ? options_.engine->CreateSequence(request.engine_layout, request.spec)
          : options_.engine->CreateSequenceFromBlocks(request.engine_layout, request.spec, blocks);
  // Fetched blocks are cached whether or not the sequence could be created; the sequence (when
  // created) already holds their pages, so a block the policy refuses is still used.
  for (size_t i = 0; i < fetched.size(); ++i) Insert(part, request.hashes[local + i], fetched[i]);
  if (!id.ok()) return id.status();
  PrefixStart out;
  out.id = *id;
  out.hit_blocks = static_cast<int64_t>(blocks.size());
  out.remote_blocks = static_cast<int64_t>(fetched.size());
  out.cached_tokens = out.hit_blocks * request.block_tokens;
  stats_.miss_blocks += static_cast<int64_t>(request.hashes.size()) - out.hit_blocks;
  PrefixTierStats& t = stats_.tiers[static_cast<int>(request.tier)];
  t.hit_blocks += static_cast<int64_t>(local);
  t.hit_tokens += static_cast<int64_t>(local) * request.block_tokens;
  t.bytes_saved += local * static_cast<uint64_t>(request.block_bytes);
  PrefixTierStats& r = stats_.tiers[kRemoteTierIndex];
  r.hit_blocks += out.remote_blocks;
  r.hit_tokens += out.remote_blocks * request.block_tokens;
  r.bytes_saved += fetched.size() * static_cast<uint64_t>(request.block_bytes);
  return out;
}

void PrefixCache::Publish(const SequenceId& seq, int64_t block_tokens,
                          absl::Span<const BlockHash> hashes, int64_t touched) {
  if (hashes.empty()) return;
  absl::StatusOr<std::vector<PinnedBlock>> pins =
      options_.engine->PinBlocks(seq, block_tokens, 0, static_cast<int64_t>(hashes.size()));
  if (!pins.ok()) {
    spdlog::warn("prefix cache: blocks of sequence {} not offered: {}", seq.ToHex(),
                 std::string(pins.status().message()));
    return;
  }
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < pins->size(); ++i) {
    const PinnedBlock& pin = (*pins)[i];
    const BlockHash& hash = hashes[i];
    Part& part = PartFor(pin.tier, pin.bytes);
    if (Find(part, hash) != nullptr) {
      // Cached already (the sequence's pages are the cached ones, or equal to them).
      if (static_cast<int64_t>(i) >= touched) part.policy->Touch(hash.lo);
      Unpin(pin.id);
      continue;
    }
    if (Insert(part, hash, pin) && options_.remote != nullptr) {
      Engine* engine = options_.engine;
      const BlockPagesId id = pin.id;
      options_.remote->PutAsync(hash, [engine, id] { return engine->ReadBlock(id); });
    }
  }
}

PrefixCacheStats PrefixCache::Stats() const {
  absl::MutexLock lock(&mu_);
  PrefixCacheStats out = stats_;
  out.tiers[static_cast<int>(Tier::kDevice)].budget_bytes = options_.device_budget_bytes;
  out.tiers[static_cast<int>(Tier::kHost)].budget_bytes = options_.host_budget_bytes;
  return out;
}

}  // namespace headwise
