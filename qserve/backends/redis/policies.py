"""The delivery policies (`qserve.core.policy`) in Redis: the Lua functions the scripts share.

Strategy: `POLICIES` follows `scripts.PRELUDE` (which has the functions that add and remove
entries: ``append``, ``remove``) in the scripts that apply a policy (`scripts.WITH_POLICIES`), so
each of them applies it in its own atomic step; the others do not define these functions at all. A script that returns entries to a group (a negative commit, a
consumer gone, a lease run out) or delivers them first calls ``take_policy``, which takes the
queue's policy off ``ARGV`` (a msgpack map `RedisQueue` packs per call, with the calling node's
clock), and answers through ``done``: its own result, then how many entries it moved to the
dead-letter queue, how many deliveries it handed back on a timeout, and when the next delay falls
due or delivery runs out, for the node to wake then (`manager.RedisBackend`). Everything a policy
keeps is in the queue's slot (`keys`): ``dd``/``di`` (dedup window), ``dc`` (delivery counts),
``dz``/``dly`` (delays), ``dt`` (deadlines), and the dead-letter queue's keys share the input
queue's hash tag, so the move is one script too.

The rules are the local dispatcher's (`qserve.core.groups`, `Dispatcher._returned`): an entry that
comes back to a group after ``max_deliveries`` deliveries to it is dead-lettered (gone for every
group); otherwise a ``_delay_`` or, without one, the retry backoff for its count hides it from that
group until due; a delivery whose deadline passed goes back as if its holder had negatively
committed it (``lastCode=timeout``). Times are the nodes' policy clock (`RedisBackend.clock_ms`),
never Redis's, so a test's mock clock moves them and every node of a deployment agrees as far as
their wall clocks do.
"""

from __future__ import annotations

__all__ = ["POLICIES", "PARKED", "DLQ_PUT", "UNPARK"]

POLICIES = r"""
-- delivery policies (`core.policy`), for the scripts that take them (`take_policy`): md
-- max_deliveries (0: off), bo 1 with a retry backoff of bi ms initial, factor bf, at most bm ms,
-- to delivery_timeout ms (0: off), now the node's clock (ms), name the queue's name, dlq the key
-- prefix of its dead-letter queue ('': none; KEYS[2], in this queue's slot), park 1 for a sink on a
-- Redis Cluster (its dead-letter queue is in another slot: `park`)
local P = {md = 0, bo = 0, to = 0, now = 0, name = '', dlq = '', park = 0}
local DEAD, TIMED_OUT = 0, 0   -- what this call moved to the dead-letter queue, handed back on timeout
local PARKED = 0               -- dead letters parked for the node to move (`park`)
local function take_policy() P = cmsgpack.unpack(table.remove(ARGV, 1)) end
-- dedup_window: `dd` (requestId -> put time, the node's wall clock ms) and `di` (requestId -> index)
-- hold the client-chosen requestIds put since `since`, consumed or not; older ones are dropped
-- here, at most 256 a call (a put drops at least as many as it adds, so they never pile up)
local function seen_within(rid, since)
  local old = redis.call('ZRANGEBYSCORE', k('dd'), '-inf', '(' .. since, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('ZREM', k('dd'), unpack(old))
    redis.call('HDEL', k('di'), unpack(old))
  end
  local at = redis.call('ZSCORE', k('dd'), rid)
  if at and tonumber(at) >= since then return tonumber(redis.call('HGET', k('di'), rid)) end
  return nil
end
local function remember_put(rid, i, at, limit)
  redis.call('ZADD', k('dd'), at, rid)
  redis.call('HSET', k('di'), rid, i)
  if redis.call('ZCARD', k('dd')) > limit then
    local oldest = redis.call('ZPOPMIN', k('dd'))
    redis.call('HDEL', k('di'), oldest[1])
  end
end
-- deliveries of an entry per group (`dc`: index -> msgpack map group -> count), counted while
-- max_deliveries or a retry backoff is on and kept while the entry is live (its group may empty)
local function deliveries(i)
  local packed = redis.call('HGET', k('dc'), i)
  if packed then return cmsgpack.unpack(packed) end
  return {}
end
local function count_delivery(i, g)
  local counts = deliveries(i)
  counts[g] = (counts[g] or 0) + 1
  KEPT = true
  redis.call('HSET', k('dc'), i, cmsgpack.pack(counts))
end
-- a delivery whose frame never left (its consumer's socket died first) counts nothing: taken back
local function uncount_delivery(i, g)
  local packed = redis.call('HGET', k('dc'), i)
  if not packed then return end
  local counts = cmsgpack.unpack(packed)
  local n = (counts[g] or 0) - 1
  if n > 0 then counts[g] = n else counts[g] = nil end
  if next(counts) == nil then
    redis.call('HDEL', k('dc'), i)
  else
    redis.call('HSET', k('dc'), i, cmsgpack.pack(counts))
  end
end
-- max_deliveries: the entry leaves this queue for every group and is appended to the dead-letter
-- queue (KEYS[2]) with its data, priority, requestId and tags, plus where it came from and why
local function letter_tags(i, g, count, f)
  local code, reason = 'detached', 'its consumer went away'
  local note = redis.call('HGET', k('n'), i)
  if note then
    local kept = cmsgpack.unpack(note)
    code, reason = kept[2], kept[3]
  end
  local tags = cmsgpack.unpack(f.t)
  tags['dlq.queue'] = P.name
  tags['dlq.index'] = tostring(i)
  tags['dlq.requestId'] = tags['requestId'] or ''
  tags['dlq.group'] = g
  tags['dlq.deliveries'] = tostring(count)
  tags['lastCode'] = code
  tags['lastReason'] = reason
  return tags
end
local function dead_letter(i, g, count)
  local f = entry(i)
  if f == nil then return end
  local tags = letter_tags(i, g, count, f)
  remove(i)
  local here = T
  T = P.dlq
  redis.call('HSETNX', k('m'), 'created', now_ms())
  append(f.d, cmsgpack.pack(tags), tonumber(f.p or '0'), f.i or '')
  T = here
  DEAD = DEAD + 1
end
-- a sink's dead letter on a Redis Cluster: its dead-letter queue is in another slot, so it is
-- parked here (`dead`: index -> msgpack {t = its dlq tags, at = when}), delivered to no group,
-- until the node moves it in three idempotent steps (`PARKED`, `DLQ_PUT`, `UNPARK`); a lease
-- round of any node moves what waited longer than 2 s (its node died in between)
local function park(i, g, count)
  local f = entry(i)
  if f == nil then return end
  KEPT = true
  redis.call('HSET', k('dead'), i, cmsgpack.pack({t = cmsgpack.pack(letter_tags(i, g, count, f)), at = P.now}))
  PARKED = PARKED + 1
end
-- delays: `dz` (zset: member '<index>:<group>', score the due time, the nodes' policy clock in
-- ms) hides an entry from one group until due; `dly` (hash: index -> msgpack map group -> due)
-- finds an entry's delays when it goes
local function delay_for(i, g, due)
  local packed = redis.call('HGET', k('dly'), i)
  local delays = packed and cmsgpack.unpack(packed) or {}
  delays[g] = due
  KEPT = true
  redis.call('HSET', k('dly'), i, cmsgpack.pack(delays))
  redis.call('ZADD', k('dz'), due, i .. ':' .. g)
end
local function undelay(member)
  local i, g = string.match(member, '^(%d+):(.*)$')
  redis.call('ZREM', k('dz'), member)
  local packed = redis.call('HGET', k('dly'), i)
  if packed then
    local delays = cmsgpack.unpack(packed)
    delays[g] = nil
    if next(delays) == nil then redis.call('HDEL', k('dly'), i)
    else redis.call('HSET', k('dly'), i, cmsgpack.pack(delays)) end
  end
end
-- is the entry hidden from group g at `now`? (a due delay is dropped)
local function delayed(i, g, now)
  local due = redis.call('ZSCORE', k('dz'), i .. ':' .. g)
  if not due then return false end
  if tonumber(due) > now then return true end
  undelay(i .. ':' .. g)
  return false
end
-- the entry is AVAILABLE to group g again (negative commit, consumer gone, lease run out): after
-- max_deliveries it is dead-lettered instead; else it waits `wait` ms (nil: the retry backoff
-- for its deliveries to g) before g sees it again
local function returned(g, i, wait)
  local counting = P.md > 0 or P.bo == 1
  if not counting and not wait then return end
  local count = 0
  if counting then count = deliveries(i)[g] or 0 end
  if P.md > 0 and count >= P.md and (P.dlq ~= '' or P.park == 1) then
    if P.dlq ~= '' then dead_letter(i, g, count) else park(i, g, count) end
    return
  end
  if wait == nil then
    wait = 0
    if P.bo == 1 and count >= 1 then wait = math.min(P.bm, P.bi * P.bf ^ (count - 1)) end
  end
  if wait > 0 then delay_for(i, g, P.now + math.floor(wait)) end
end
-- a negative commit's annotations: count, lastCode, lastReason (`n`)
local function annotate(i, code, reason)
  local old = redis.call('HGET', k('n'), i)
  local count = old and cmsgpack.unpack(old)[1] or 0
  redis.call('HSET', k('n'), i, cmsgpack.pack({count + 1, code, reason}))
end
-- delivery_timeout: `dt` (zset: member '<index>:<group>', score the delivery's deadline, the
-- nodes' policy clock in ms); a delivery whose deadline passed goes back to its group as if its
-- holder had negatively committed it (lastCode=timeout, another member first), its slot freed
local function expire_deliveries()
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', k('dt'), '-inf', P.now, 'LIMIT', 0, 256)) do
    redis.call('ZREM', k('dt'), member)
    local i, g = string.match(member, '^(%d+):(.*)$')
    local c = redis.call('HGET', k('o:' .. g), i)
    if c then
      redis.call('HDEL', k('o:' .. g), i)
      redis.call('HINCRBY', k('h'), c, -1)
      redis.call('HSET', k('a:' .. g), i, c)
      annotate(i, 'timeout', 'held by ' .. c .. ' for ' .. P.ts .. ' s without a commit')
      TIMED_OUT = TIMED_OUT + 1
      returned(g, tonumber(i), nil)
    end
  end
  if TIMED_OUT > 0 then changed() end
end
-- a policy script's reply: its own result, what the policies did, and when the next delay falls
-- due or delivery runs out (0: none), for the node to wake then; due delays are dropped first
-- (256 a call) and announced to every node
local function done(result)
  local due = redis.call('ZRANGEBYSCORE', k('dz'), '-inf', P.now, 'LIMIT', 0, 256)
  for _, member in ipairs(due) do undelay(member) end
  if #due > 0 then changed() end   -- every node's watchers: entries are visible again
  local wake = 0
  for _, key in ipairs({'dz', 'dt'}) do
    local first = redis.call('ZRANGE', k(key), 0, 0, 'WITHSCORES')
    if #first > 0 and (wake == 0 or tonumber(first[2]) < wake) then wake = tonumber(first[2]) end
  end
  local parked = PARKED
  if P.park == 1 and PARKED == 0 and redis.call('EXISTS', k('dead')) == 1 then
    local flat = redis.call('HGETALL', k('dead'))
    for j = 2, #flat, 2 do
      if cmsgpack.unpack(flat[j]).at < P.now - 2000 then parked = parked + 1 end
    end
  end
  return {result, DEAD, TIMED_OUT, wake, parked}
end
"""

#: (a parking sink: `park`) ARGV: at most this many -> {index, payload, dlq tags (msgpack),
#: priority, requestId} of parked entries
PARKED = r"""
local out = {}
local flat = redis.call('HGETALL', k('dead'))
for j = 1, #flat, 2 do
  if #out >= tonumber(ARGV[1]) then break end
  local i = tonumber(flat[j])
  local f = entry(i)
  if f then out[#out + 1] = {i, f.d, cmsgpack.unpack(flat[j + 1]).t, f.p or '0', f.i or ''} end
end
return out
"""

#: (on the dead-letter queue) ARGV: the node's policy clock ms, then per letter: its origin
#: ('<queue name>:<index>'), payload, tags, priority, requestId -> how many were appended; `mv`
#: (zset: origin -> when) makes a repeated move append nothing (kept an hour)
DLQ_PUT = r"""
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', k('mv'), '-inf', now - 3600000)
redis.call('HSETNX', k('m'), 'created', now_ms())
local n = 0
for j = 2, #ARGV, 5 do
  if not redis.call('ZSCORE', k('mv'), ARGV[j]) then
    append(ARGV[j + 1], ARGV[j + 2], tonumber(ARGV[j + 3]), ARGV[j + 4])
    redis.call('ZADD', k('mv'), now, ARGV[j])
    n = n + 1
  end
end
return n
"""

#: (a parking sink) ARGV: indexes moved -> how many were still parked (now gone for every group)
UNPARK = r"""
local n = 0
for j = 1, #ARGV do
  if redis.call('HEXISTS', k('dead'), ARGV[j]) == 1 then n = n + remove(tonumber(ARGV[j])) end
end
if n > 0 then changed() end
return n
"""
