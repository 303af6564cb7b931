"""The Lua scripts that make every multi-step change atomic (one round trip each).

Why Lua: a message must never be in no place at all. Popping it and recording it as held by a
consumer, giving a dead consumer's messages back, and moving a message to the dead-letter list each
happen inside one script, so a crash or a lost connection between two steps cannot lose or duplicate
a message, and two restorers can never both give back the same message.

Key layout and record format: see `keys.py`. Scripts touch keys they derive from the queue names and
consumer ids they are given or read (the restorer); on Redis Cluster those names carry the queue's
hash tag (`keys.Layout`), so every key a script derives lies in the slot of the keys it was given.
"""

from __future__ import annotations

from typing import Final

from millpond_broker_redis.keys import COUNTS_TTL

# Shared helpers, prepended to the scripts that give messages back to their queues. A record is
# `<count>:<len(queue)>:<step>:<queue><envelope>`; giving it back pushes the envelope to the front
# (the right end, where consumers pop) and remembers its delivery count outside the envelope, keyed
# by the envelope's sha1, so the envelope stays byte-for-byte what the producer sent.
_RESTORE: Final = f"""
local function restore_record(rec, sep, uncount)
  local count, qlen, step, start = string.match(rec, '^(%d+):(%d+):(%d+):()')
  if not count then return 0 end
  count = tonumber(count) - uncount
  qlen = tonumber(qlen)
  local queue = string.sub(rec, start, start + qlen - 1)
  local payload = string.sub(rec, start + qlen)
  local key = queue
  if step ~= '0' then key = queue .. sep .. step end
  redis.call('RPUSH', key, payload)
  if count > 0 then
    local ck = 'millpond:counts:' .. queue
    redis.call('HSET', ck, redis.sha1hex(payload), count)
    redis.call('EXPIRE', ck, {COUNTS_TTL})
  end
  return 1
end

local function restore_all(ukey, sep)
  local flat = redis.call('HGETALL', ukey)
  local tags, recs = {{}}, {{}}
  for i = 1, #flat, 2 do
    local t = tonumber(flat[i])
    if t then
      tags[#tags + 1] = t
      recs[t] = flat[i + 1]
    end
  end
  -- newest first, so the oldest message ends up at the very front of its queue
  table.sort(tags, function(a, b) return a > b end)
  local n = 0
  for _, t in ipairs(tags) do n = n + restore_record(recs[t], sep, 0) end
  redis.call('DEL', ukey)
  return n
end
"""

#: KEYS: unacked hash, lease key, consumers set.
#: ARGV: consumer id, max count, first tag, lease ms, sep, nq, queues..., ns, steps...
#: Returns {n, (queue index, delivery count, envelope) * n, size of the unacked hash}; when n is
#: 0, {0, ms until the next delayed message of these queues is due or -1, size of the hash}. The
#: size lets the consumer notice entries it no longer holds (settlements a failover lost).
FETCH: Final = """
local ukey, lkey, reg = KEYS[1], KEYS[2], KEYS[3]
local want = tonumber(ARGV[2])
local tag = tonumber(ARGV[3])
local sep = ARGV[5]
local nq = tonumber(ARGV[6])
local queues = {}
for i = 1, nq do queues[i] = ARGV[6 + i] end
local ns = tonumber(ARGV[7 + nq])
local steps = {}
for i = 1, ns do steps[i] = ARGV[7 + nq + i] end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- promote due delayed messages to the back of their queues
for qi = 1, nq do
  local q = queues[qi]
  local dkey = 'millpond:delayed:' .. q
  local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    for _, m in ipairs(due) do
      local step, start = string.match(m, '^(%d+):()')
      if not step then step, start = '0', 1 end
      local key = q
      if step ~= '0' then key = q .. sep .. step end
      redis.call('LPUSH', key, string.sub(m, start))
    end
    redis.call('ZREM', dkey, unpack(due))
  end
end

-- reserve up to `want` messages: priority steps first, then queues in the given order
local out = {0}
local fields = {}
local n = 0
for si = 1, ns do
  if n >= want then break end
  local step = steps[si]
  for qi = 1, nq do
    if n >= want then break end
    local q = queues[qi]
    local key = q
    if step ~= '0' then key = q .. sep .. step end
    local got = redis.call('RPOP', key, want - n)
    if got then
      local ck = 'millpond:counts:' .. q
      local tracked = redis.call('EXISTS', ck) == 1
      local head = ':' .. #q .. ':' .. step .. ':' .. q
      for _, payload in ipairs(got) do
        local count = 1
        if tracked then
          local h = redis.sha1hex(payload)
          local seen = redis.call('HGET', ck, h)
          if seen then
            count = tonumber(seen) + 1
            redis.call('HDEL', ck, h)
          end
        end
        fields[#fields + 1] = tag + n
        fields[#fields + 1] = count .. head .. payload
        n = n + 1
        out[#out + 1] = qi
        out[#out + 1] = count
        out[#out + 1] = payload
      end
    end
  end
end

if n > 0 then
  redis.call('HSET', ukey, unpack(fields))
  redis.call('SADD', reg, ARGV[1])
  if redis.call('EXISTS', lkey) == 0 then redis.call('SET', lkey, '1', 'PX', ARGV[4]) end
  out[1] = n
  out[#out + 1] = redis.call('HLEN', ukey)
  return out
end

local best = -1
for qi = 1, nq do
  local first = redis.call('ZRANGE', 'millpond:delayed:' .. queues[qi], 0, 0, 'WITHSCORES')
  if first[2] then
    local wait = math.max(0, math.ceil((tonumber(first[2]) - now) * 1000))
    if best < 0 or wait < best then best = wait end
  end
end
out[2] = best
out[3] = redis.call('HLEN', ukey)
return out
"""

#: KEYS: unacked hash. ARGV: sep, uncount (1: the delivery never reached the app), tags...
#: Gives the named deliveries back to the front of their queues; returns how many were found.
REQUEUE: Final = (
    _RESTORE
    + """
local n = 0
local uncount = tonumber(ARGV[2])
for i = 3, #ARGV do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + restore_record(rec, ARGV[1], uncount)
  end
end
return n
"""
)

#: KEYS: unacked hash, dead-letter list. ARGV: tag, envelope with the death reason.
DEAD_LETTER: Final = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""

#: KEYS: unacked hash, lease key, consumers set. ARGV: sep, consumer id.
CLOSE: Final = (
    _RESTORE
    + """
local n = restore_all(KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
return n
"""
)

#: KEYS: lease key, consumers set, restore gate, then a serving set per queue. ARGV: lease ms,
#: sep, gate ms, consumer id. Refreshes this consumer's lease and its place in each queue's
#: serving set (dropping the consumers whose lease there ended), then (at most once per gate
#: period across all consumers) gives back the messages of every consumer whose lease expired.
#: Returns {lease was alive, restored}.
BEAT: Final = (
    _RESTORE
    + """
local alive = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
if #KEYS > 3 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[1]))
  end
end
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then return {alive, -1} end
local restored = 0
for _, cid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', 'millpond:lease:' .. cid) == 0 then
    restored = restored + restore_all('millpond:unacked:' .. cid, ARGV[2])
    redis.call('SREM', KEYS[2], cid)
  end
end
return {alive, restored}
"""
)

#: KEYS: a queue's serving set. ARGV: a consumer id to leave out ('' for none). How many live
#: consumers serve the queue (by Redis's clock), and removes that consumer from the set.
SERVING: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

#: KEYS: consumers set, serving set, delayed set, then the queue's lists. ARGV: queue.
#: Returns {ready, delayed, reserved, live consumers}: `reserved` counts the records of every
#: registered consumer's unacked hash that belong to the queue (read server-side: no payload
#: crosses the network), so one round trip answers `queue_stats`.
STATS: Final = """
local q = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready = 0
for i = 4, #KEYS do ready = ready + redis.call('LLEN', KEYS[i]) end
local reserved = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, rec in ipairs(redis.call('HVALS', 'millpond:unacked:' .. id)) do
    local qlen, start = string.match(rec, '^%d+:(%d+):%d+:()')
    if qlen and tonumber(qlen) == #q and string.sub(rec, start, start + #q - 1) == q then
      reserved = reserved + 1
    end
  end
end
local consumers = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
return {ready, redis.call('ZCARD', KEYS[3]), reserved, consumers}
"""

#: KEYS: delayed set. ARGV: eta, member, bell channel. Rings the bell when this message is now the
#: earliest, so a consumer blocked on an empty queue recomputes when to wake.
DELAY: Final = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if first[1] == ARGV[2] then redis.call('PUBLISH', ARGV[3], ARGV[1]) end
return 1
"""

#: KEYS: dead-letter list. ARGV: (old envelope, new envelope, target list) * n. Moves each old
#: envelope that is still there; a concurrent replay of the same message moves it only once.
REPLAY: Final = """
local moved = 0
for i = 1, #ARGV, 3 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    redis.call('LPUSH', ARGV[i + 2], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
"""

# -- chords: Celery's Redis join (keys and records in `keys.py`), so a chord's header may run on
# Celery workers, millpond workers or both, and its body is sent once.

#: Return one header part, and claim the join if this part completes it.
#: KEYS: .j (parts), .t (added at run time), .s (size), .d (parts seen), the saved group, .c (claim)
#: ARGV: task id, part record (JSON), score (group index or +inf), expiry s (0: none),
#:       saved-group expiry s (0: none), claim ms, claim token
#: Returns {-1} once the chord is done; {parts so far} when this caller does not hold the join;
#: {parts so far, every record in header order} to the one caller that now holds the claim.
CHORD_RETURN: Final = """
local parts, added, size_key, seen, saved, claim =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('GET', claim) == 'done' then return {-1} end
-- the same task at the same index counts once, whatever a second run returned
if redis.call('SADD', seen, ARGV[1] .. ':' .. ARGV[3]) == 1 then
  redis.call('ZADD', parts, ARGV[3], ARGV[2])
end
local ttl, saved_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if ttl > 0 then
  for _, key in ipairs({parts, added, size_key, seen}) do redis.call('EXPIRE', key, ttl) end
  if saved_ttl > 0 then redis.call('EXPIRE', saved, saved_ttl) end
end
local count = redis.call('ZCARD', parts)
local size = redis.call('GET', size_key)
if not size then return {count} end
if count ~= tonumber(size) + tonumber(redis.call('GET', added) or '0') then return {count} end
-- complete: the first caller to find it so (or the first after a lapsed claim) holds it; the
-- holder's own retry (its reply was lost) finds its token there and gets the parts again
local holder = redis.call('GET', claim)
if holder ~= ARGV[7] then
  if holder or not redis.call('SET', claim, ARGV[7], 'NX', 'PX', ARGV[6]) then return {count} end
end
return {count, redis.call('ZRANGE', parts, 0, -1)}
"""

#: The holder of the claim is done (body sent, or chord failed): drop the join's keys and leave
#: `done` in the claim, so a late copy of a part cannot start the join again.
#: KEYS: .c, .j, .t, .s, .d.  ARGV: claim token, seconds the done marker lasts.
#: Returns 1, or 0 when the claim is no longer this caller's (it lapsed and passed on).
CHORD_DONE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return 1
"""

#: The holder of the claim could not send the body: give the claim up now (not after its expiry),
#: so the next return of a part, its redelivered header task, completes the join again.
#: KEYS: .c.  ARGV: claim token.  Returns 1, or 0 when the claim was not this caller's.
CHORD_RELEASE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

#: How long the join stays claimed, when it is complete, not done and claimed (by millpond or by
#: Celery: the claim may be a dead worker's). KEYS: .c, .j, .t, .s.
#: Returns the claim's PTTL in ms, or -1 when the join is not complete-and-claimed.
CHORD_CLAIMED: Final = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == 'done' then return -1 end
local size = redis.call('GET', KEYS[4])
if not size then return -1 end
local want = tonumber(size) + tonumber(redis.call('GET', KEYS[3]) or '0')
if redis.call('ZCARD', KEYS[2]) ~= want then return -1 end
return redis.call('PTTL', KEYS[1])
"""

# A global rate limit's token bucket, refilled from Redis's own clock (TIME), so every worker counts
# time the same way whatever its clock says. One script reads, refills, takes and writes back, so
# two workers never both take the last token. Scripts replicate by their effects (Redis 5+), so
# TIME before a write is allowed. ARGV: rate (tokens per second), capacity. Replies the seconds to
# wait as text ("0" when a token was taken): Lua numbers come back as integers.
RATE_LIMIT: Final = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * rate)
  stamp = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""
