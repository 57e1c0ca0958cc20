"""Lua scripts of the reliable request queue (each runs atomically on the Redis server).

Keys of a queue whose base key is ``K`` (scrapy-redis's ``SCHEDULER_QUEUE_KEY``):

- ``K:pending`` — sorted set id → score (-priority; ids are zero-padded, so equal
  priorities pop in push order);
- ``K:data`` / ``K:prio`` — hashes id → serialised request / score;
- ``K:processing`` — sorted set id → visibility deadline (ms, Redis clock): popped and
  leased to the worker in ``K:owner`` until then (its heartbeat moves the deadline);
- ``K:deliveries`` — hash id → times popped;
- ``K:quarantine`` / ``K:qdata`` — hashes id → JSON record / serialised request;
- ``K:seq`` — the id counter.
"""

from __future__ import annotations

KEYS = ("pending", "data", "prio", "processing", "owner", "deliveries", "quarantine", "qdata",
        "seq")

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the queue's keys in KEYS order. ARGV: score, payload. Returns the id.
PUSH = """
local id = string.format('%015d', redis.call('INCR', KEYS[9]))
redis.call('HSET', KEYS[2], id, ARGV[2])
redis.call('HSET', KEYS[3], id, ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[1], id)
return id
"""

# Requests whose visibility deadline passed (their worker stopped heartbeating) go back
# to pending, or past ARGV[3] deliveries to the quarantine. ARGV[4]: most to reclaim.
_RECLAIM = """
local requeued, quarantined = 0, 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0,
                           tonumber(ARGV[4]))
for _, id in ipairs(expired) do
  local owner = redis.call('HGET', KEYS[5], id) or ''
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  local payload = redis.call('HGET', KEYS[2], id)
  local n = tonumber(redis.call('HGET', KEYS[6], id) or '0')
  if payload then
    if n >= tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[8], id, payload)
      redis.call('HSET', KEYS[7], id, cjson.encode({reason = 'max_deliveries', deliveries = n,
                                                    last_worker = owner, at = now}))
      redis.call('HDEL', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', KEYS[6], id)
      quarantined = quarantined + 1
    else
      redis.call('ZADD', KEYS[1], redis.call('HGET', KEYS[3], id) or 0, id)
      requeued = requeued + 1
    end
  end
end
"""

# KEYS: the queue's keys. ARGV: worker, visibility ms, max deliveries, reclaim limit.
# Returns {requeued, quarantined} or {requeued, quarantined, id, payload, deliveries}.
POP = NOW + _RECLAIM + """
while true do
  local got = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #got == 0 then return {requeued, quarantined} end
  local id = got[1]
  redis.call('ZREM', KEYS[1], id)
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    local n = redis.call('HINCRBY', KEYS[6], id, 1)
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[5], id, ARGV[1])
    return {requeued, quarantined, id, payload, n}
  end
end
"""

# KEYS: the queue's keys. ARGV: worker, visibility ms, max deliveries, reclaim limit.
RECLAIM = NOW + _RECLAIM + "return {requeued, quarantined}"

# KEYS: the queue's keys. ARGV: id, worker. 1 acked (own lease), 2 acked but it had been
# re-delivered (stale), 0 unknown (acked or quarantined already).
ACK = """
local id = ARGV[1]
local owner = redis.call('HGET', KEYS[5], id)
local known = redis.call('HDEL', KEYS[2], id)
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[3], id)
redis.call('HDEL', KEYS[6], id)
if known == 0 then return 0 end
if owner == ARGV[2] then return 1 end
return 2
"""

# KEYS: the queue's keys. ARGV: id, worker. Back to pending now, this delivery not
# counted (the worker gave it back: closing, cancelled to resume later). 1 done, 0 not ours.
NACK = """
local id = ARGV[1]
if redis.call('HGET', KEYS[5], id) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
if redis.call('HEXISTS', KEYS[2], id) == 0 then return 0 end
if tonumber(redis.call('HINCRBY', KEYS[6], id, -1)) <= 0 then redis.call('HDEL', KEYS[6], id) end
redis.call('ZADD', KEYS[1], redis.call('HGET', KEYS[3], id) or 0, id)
return 1
"""

# KEYS: the queue's keys. ARGV: id, worker, JSON record. Done for good, kept for an operator.
QUARANTINE = """
local id = ARGV[1]
local payload = redis.call('HGET', KEYS[2], id)
if not payload then return 0 end
redis.call('HSET', KEYS[8], id, payload)
redis.call('HSET', KEYS[7], id, ARGV[3])
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
redis.call('HDEL', KEYS[6], id)
return 1
"""

# KEYS: processing, owner. ARGV: worker, visibility ms, ids... Moves the deadline of every
# id still leased to this worker; returns how many.
RENEW = NOW + """
local renewed = 0
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""
