"""Lua scripts of the reliable request queue (each runs atomically on the Redis server).

Keys of a queue whose base key is ``K`` (scrapy-redis's ``SCHEDULER_QUEUE_KEY``):

- ``K:pending`` — sorted set id → score (-priority; ids are zero-padded, so equal
  priorities pop in push order);
- ``K:data`` / ``K:prio`` — hashes id → serialised request / score;
- ``K:processing`` — sorted set id → visibility deadline (ms, Redis clock): popped and
  leased to the worker in ``K:owner`` until then (its heartbeat moves the deadline);
- ``K:deliveries`` — hash id → times popped;
- ``K:quarantine`` / ``K:qdata`` — hashes id → JSON record / serialised request;
- ``K:seq`` — the id counter;
- ``K:intent`` / ``K:intents`` — a request about to pass the dupefilter: token → its
  score, a newline and the serialised request; and token → deadline. scrapy-redis marks a request
  seen (SADD) *before* it pushes it; a worker killed between the two would lose it for
  good (every later copy is "seen"). The intent, written before the dupefilter, is
  removed by the push; one left past its deadline is pushed by the next pop.
"""

from __future__ import annotations

KEYS = ("pending", "data", "prio", "processing", "owner", "deliveries", "quarantine", "qdata",
        "seq", "intent", "intents")

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ADD = """
local function add(score, payload)
  local id = string.format('%015d', redis.call('INCR', KEYS[9]))
  redis.call('HSET', KEYS[2], id, payload)
  redis.call('HSET', KEYS[3], id, score)
  redis.call('ZADD', KEYS[1], score, id)
  return id
end
"""

_PUSH = """
local function push(score, payload, token)
  if token ~= '' then
    if redis.call('HDEL', KEYS[10], token) == 0 then return 0 end
    redis.call('ZREM', KEYS[11], token)
  end
  return add(score, payload)
end
"""

# KEYS: the queue's keys in KEYS order. ARGV: score, payload, intent token or '' (one
# triple per request, in push order). Returns the last one's id, or 0 when its intent was
# already pushed by another worker's pop.
PUSH = _ADD + _PUSH + """
local id = 0
for i = 1, #ARGV, 3 do id = push(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return id
"""

# KEYS: the queue's keys. ARGV: token, score, payload, deadline ms from now;
# then optionally the dupefilter key and the request's fingerprint: a request the
# dupefilter has seen already will be dropped, so no intent is written (returns 0).
INTENT = NOW + """
if ARGV[5] and redis.call('SISMEMBER', ARGV[5], ARGV[6]) == 1 then return 0 end
redis.call('HSET', KEYS[10], ARGV[1], ARGV[2] .. '\\n' .. ARGV[3])
redis.call('ZADD', KEYS[11], now + tonumber(ARGV[4]), ARGV[1])
return 1
"""

# KEYS: the queue's keys. ARGV: token. The dupefilter dropped the request after all.
DROP_INTENT = """
redis.call('ZREM', KEYS[11], ARGV[1])
return redis.call('HDEL', KEYS[10], ARGV[1])
"""

# Requests whose visibility deadline passed (their worker stopped heartbeating) go back
# to pending, or past ARGV[3] deliveries to the quarantine; intents left by a dead worker
# are pushed. ARGV[4]: most to reclaim of each.
_RECLAIM = _ADD + """
local requeued, quarantined = 0, 0
local orphans = redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', now, 'LIMIT', 0,
                           tonumber(ARGV[4]))
for _, token in ipairs(orphans) do
  redis.call('ZREM', KEYS[11], token)
  local value = redis.call('HGET', KEYS[10], token)
  if value then
    redis.call('HDEL', KEYS[10], token)
    local cut = string.find(value, '\\n', 1, true)
    add(string.sub(value, 1, cut - 1), string.sub(value, cut + 1))
    requeued = requeued + 1
  end
end
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

# KEYS: the queue's keys. ARGV: worker, visibility ms, max deliveries, reclaim limit, then
# requests to push first (triples as PUSH's). Returns {requeued, quarantined} or {requeued, quarantined, id, payload, deliveries,
# pending left} (0 left: the next pop may wait like one that found nothing).
POP = NOW + _RECLAIM + _PUSH + """
for i = 5, #ARGV, 3 do push(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
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
    return {requeued, quarantined, id, payload, n, redis.call('ZCARD', KEYS[1])}
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
