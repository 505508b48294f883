"""Independent LRU, LFU, S3-FIFO and ARC over a Mooncake trace's flat block-id string.

The hit counts request_replay_test.cc pins for the conversation trace come from this script:
    python3 tests/replay/reference_policies.py ../shared/data/traces/mooncake/conversation_trace.jsonl
It shares no code with cachesvc/replay (OrderedDict queues, a lazy heap for LFU) and follows the
same rules: block_cache.h.
"""
import heapq
import json
import math
import sys
from collections import OrderedDict

refs = []
for line in open(sys.argv[1]):
    if line.strip():
        refs += json.loads(line)["hash_ids"]


def lru(c):
    cache = OrderedDict()
    hits = 0
    for x in refs:
        if x in cache:
            hits += 1
            cache.move_to_end(x)
        else:
            if len(cache) >= c:
                cache.popitem(last=False)
            cache[x] = 1
    return hits

def arc(c):
    """ARC, Megiddo & Modha FAST'03 Fig. 4. Dicts are ordered LRU first, MRU last."""
    t1, t2, b1, b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    p = 0.0
    hits = 0

    def replace(in_b2):
        if len(t1) + len(t2) < c:
            return
        if not t2 or (t1 and ((in_b2 and len(t1) == p) or len(t1) > p)):
            b1[t1.popitem(last=False)[0]] = 1
        else:
            b2[t2.popitem(last=False)[0]] = 1

    for x in refs:
        if x in t1:
            del t1[x]
            t2[x] = 1
            hits += 1
        elif x in t2:
            t2.move_to_end(x)
            hits += 1
        elif x in b1:
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(False)
            del b1[x]
            t2[x] = 1
        elif x in b2:
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(True)
            del b2[x]
            t2[x] = 1
        else:
            l1 = len(t1) + len(b1)
            total = l1 + len(t2) + len(b2)
            if l1 >= c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    replace(False)
                else:
                    t1.popitem(last=False)
            elif total >= c:
                if total >= 2 * c:
                    b2.popitem(last=False)
                replace(False)
            t1[x] = 1
    return hits


def s3fifo(c):
    """S3-FIFO as libCacheSim's S3FIFOv0. Dicts are ordered tail (oldest) first."""
    small_cap = max(1, c // 10)
    main_cap = c - small_cap
    small, main, ghost = OrderedDict(), OrderedDict(), OrderedDict()
    freq = {}
    hits = 0

    def evict_main():
        while main:
            tail = next(iter(main))
            if freq[tail] > 0:
                freq[tail] = min(freq[tail], 3) - 1
                main.move_to_end(tail)
            else:
                del main[tail], freq[tail]
                return

    def evict_small():
        while small:
            tail = next(iter(small))
            del small[tail]
            if freq[tail] >= 2:
                main[tail] = 1
                freq[tail] = 0
                continue
            del freq[tail]
            if main_cap > 0:
                ghost[tail] = 1
                while len(ghost) > main_cap:
                    ghost.popitem(last=False)
            return

    for x in refs:
        if x in small or x in main:
            freq[x] = min(freq[x] + 1, 3)
            hits += 1
            continue
        in_ghost = x in ghost
        if in_ghost:
            del ghost[x]
        while len(small) + len(main) >= c:
            if len(main) > main_cap or not small:
                evict_main()
            else:
                evict_small()
        (main if in_ghost else small)[x] = 1
        freq[x] = 0
    return hits


def lfu(c):
    """LFU, ties to the least recently used; a lazy heap of (count, last tick, id)."""
    entries = {}
    heap = []
    hits = 0
    for tick, x in enumerate(refs):
        if x in entries:
            hits += 1
            entries[x] = (entries[x][0] + 1, tick)
        else:
            while len(entries) >= c:
                count, last, victim = heapq.heappop(heap)
                if entries.get(victim) == (count, last):
                    del entries[victim]
            entries[x] = (1, tick)
        heapq.heappush(heap, (*entries[x], x))
    return hits


unique = len(set(refs))
for share in (0.05, 0.10, 0.25):
    c = max(1, math.ceil(share * unique - 1e-9))  # rounded up, as the replay does
    print(f"{share:.0%} ({c} blocks): lru {lru(c)} lfu {lfu(c)} s3fifo {s3fifo(c)} arc {arc(c)}")
