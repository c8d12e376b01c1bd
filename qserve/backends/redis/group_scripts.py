"""The Lua scripts of a Redis queue's consumer groups: deliver, commit, negative, attach, release, lease.

This is the consumer-group state machine of `qserve.core.groups` (and `core.group_state`'s Rules
1 and 2), kept in Redis instead of one process's memory: per group, ``o:<G>`` says who holds what
(PENDING), everything else stored is AVAILABLE, and a removal is GONE in every group at once. Like
every script of the backend (`scripts`, whose strategy applies here too) each one runs atomically
with `scripts.PRELUDE` prepended; those that apply the delivery policies also get
`scripts.WITH_POLICIES`.

Costs: a delivery walks the priority set, then the stream from the consumer's start, skipping what
its group holds: O(pending in the group + entries returned), plus, for a consumer with a tag
filter, every entry that does not match (no per-filter index here, unlike the local backend).
"""

from __future__ import annotations

from qserve.backends.redis.scripts import WITH_POLICIES

__all__ = ["DELIVER", "COMMIT", "NEGATIVE", "ATTACH", "RELEASE", "LEASE"]

#: ARGV: policy (`take_policy`), consumer id, its attach token, slots in use outside Redis
#: (auto-commit frames not yet written), delete (0/1: auto-commit) -> {free slots left,
#: entries...}; -1: not attached here
DELIVER = WITH_POLICIES + r"""
take_policy()
local cid = ARGV[1]
local rec = redis.call('HGET', k('c'), cid)
if not rec then return -1 end
local m = cmsgpack.unpack(rec)
if m.tok ~= ARGV[2] then return -1 end
local free = m.win - tonumber(redis.call('HGET', k('h'), cid) or '0') - tonumber(ARGV[3])
if free <= 0 then return {0} end
local g = m.g
local own, avoid = k('o:' .. g), k('a:' .. g)
local others = nil
local function another_can_take(i, f)
  if others == nil then
    others = {}
    for _, o in ipairs(redis.call('SMEMBERS', k('gm:' .. g))) do
      if o ~= cid then
        local om = cmsgpack.unpack(redis.call('HGET', k('c'), o))
        om.free = om.win - tonumber(redis.call('HGET', k('h'), o) or '0')
        others[#others + 1] = om
      end
    end
  end
  for _, om in ipairs(others) do
    if om.free > 0 and i >= om.start and matches(f.t, om.tags) then return true end
  end
  return false
end
local chosen = {}
local any_delay = redis.call('EXISTS', k('dz')) == 1
local any_parked = redis.call('EXISTS', k('dead')) == 1
walk(m.start, function(i, f)
  if redis.call('HEXISTS', own, i) == 1 then return false end
  if any_parked and redis.call('HEXISTS', k('dead'), i) == 1 then return false end
  if any_delay and delayed(i, g, P.now) then return false end
  if not matches(f.t, m.tags) then return false end
  if redis.call('HGET', avoid, i) == cid and another_can_take(i, f) then return false end
  chosen[#chosen + 1] = annotated(i, f)
  return #chosen >= free
end)
if #chosen == 0 then return {free} end
local now, top = now_ms(), 0
for _, e in ipairs(chosen) do
  redis.call('HSET', own, e[1], cid)
  redis.call('HDEL', avoid, e[1])
  if e[1] > top then top = e[1] end
end
redis.call('HINCRBY', k('h'), cid, #chosen)
redis.call('HINCRBY', k('gi:' .. g), 'd', #chosen)
if top > tonumber(redis.call('HGET', k('gi:' .. g), 'l') or '0') then redis.call('HSET', k('gi:' .. g), 'l', top) end
redis.call('HINCRBY', k('cs'), cid .. ':d', #chosen)
if top > tonumber(redis.call('HGET', k('cs'), cid .. ':l') or '0') then redis.call('HSET', k('cs'), cid .. ':l', top) end
redis.call('HSET', k('la'), cid, now)
if ARGV[4] == '1' then
  for _, e in ipairs(chosen) do remove(e[1]) end
  changed()
else
  if P.md > 0 or P.bo == 1 then
    for _, e in ipairs(chosen) do count_delivery(e[1], g) end
  end
  if P.to > 0 then
    KEPT = true
    for _, e in ipairs(chosen) do redis.call('ZADD', k('dt'), P.now + P.to, e[1] .. ':' .. g) end
  end
end
local out = {free - #chosen}
for _, e in ipairs(chosen) do out[#out + 1] = e end
return out
"""

#: ARGV: group, consumer id (delivery_timeout: who commits; '': anyone), indexes... -> how many
#: were live; an entry another member of that group holds now (the committer's lease ran out) is
#: left alone
COMMIT = r"""
local now, n = now_ms(), 0
local mine = ARGV[1] ~= '' and k('o:' .. ARGV[1])
for j = 3, #ARGV do
  local i = tonumber(ARGV[j])
  local holder = mine and redis.call('HGET', mine, i)
  if not holder or holder == ARGV[2] then
    for _, g in ipairs(groups()) do
      local c = redis.call('HGET', k('o:' .. g), i)
      if c then redis.call('HSET', k('la'), c, now) end
    end
    n = n + remove(i)
  end
end
changed()
return n
"""

#: ARGV: policy (`take_policy`), code, reason, delay ms (-1: the policy's backoff), group (the
#: refusing identity's; '': every group holding them), indexes... -> `done`: how many were held
NEGATIVE = WITH_POLICIES + r"""
take_policy()
local now, hit, n = now_ms(), {}, 0
local wait = tonumber(ARGV[3])
if wait < 0 then wait = nil end
local concerned = groups()
if ARGV[4] ~= '' then concerned = {ARGV[4]} end
for _, g in ipairs(concerned) do
  for j = 5, #ARGV do
    local i = tonumber(ARGV[j])
    local c = redis.call('HGET', k('o:' .. g), i)
    if c then
      redis.call('HDEL', k('o:' .. g), i)
      redis.call('HINCRBY', k('h'), c, -1)
      redis.call('HSET', k('la'), c, now)
      redis.call('HSET', k('a:' .. g), i, c)
      redis.call('ZREM', k('dt'), i .. ':' .. g)
      if not hit[i] then
        hit[i] = true
        n = n + 1
        annotate(i, ARGV[1], ARGV[2])
      end
      returned(g, i, wait)
    end
  end
end
if n > 0 then changed() end
return done(n)
"""

#: ARGV: policy (`take_policy`), consumer id, token, group, window, start (-1 = from the next
#: put), auto (0/1), node, lease ms, filter pairs... -> `done`: the token of the consumer it
#: replaced, or ''
ATTACH = WITH_POLICIES + r"""
take_policy()
local cid = ARGV[1]
local old = drop_member(cid)
local start = tonumber(ARGV[5])
if start == -1 then start = tonumber(redis.call('HGET', k('m'), 'last') or '0') + 1 end
local filter = {}
for j = 9, #ARGV do filter[#filter + 1] = ARGV[j] end
local g, now = ARGV[3], now_ms()
redis.call('HSET', k('c'), cid, cmsgpack.pack({g = g, tok = ARGV[2], win = tonumber(ARGV[4]),
  start = start, auto = tonumber(ARGV[6]), tags = filter, node = ARGV[7]}))
redis.call('SADD', k('gm:' .. g), cid)
redis.call('SADD', k('gs'), g)
redis.call('HSET', k('h'), cid, 0)
redis.call('HSET', k('la'), cid, now)
redis.call('HSET', k('lease'), cid, now + tonumber(ARGV[8]))
if old then redis.call('PUBLISH', k('ev'), 'k' .. cid .. ' ' .. old.tok) end
changed()
if old then return done(old.tok) end
return done('')
"""

#: ARGV: policy (`take_policy`), consumer id, token, the indexes it holds whose frames never left
#: (their deliveries are taken back before they go back to the group) -> `done`: 1 if it was
#: attached with that token
RELEASE = WITH_POLICIES + r"""
take_policy()
local cid = ARGV[1]
local rec = redis.call('HGET', k('c'), cid)
if not rec then return done(0) end
local m = cmsgpack.unpack(rec)
if m.tok ~= ARGV[2] then return done(0) end
for j = 3, #ARGV do
  if redis.call('HGET', k('o:' .. m.g), ARGV[j]) == cid then uncount_delivery(ARGV[j], m.g) end
end
drop_member(cid)
changed()
return done(1)
"""

#: ARGV: policy (`take_policy`), lease ms, then consumer id, token pairs of this node's
#: consumers: renews their leases and expires the consumers of any node whose lease ran out ->
#: `done`: the ids given that are not attached (with their token) any more
LEASE = WITH_POLICIES + r"""
take_policy()
local now, lease = now_ms(), tonumber(ARGV[1])
local gone = {}
for j = 2, #ARGV, 2 do
  local rec = redis.call('HGET', k('c'), ARGV[j])
  if rec and cmsgpack.unpack(rec).tok == ARGV[j + 1] then
    redis.call('HSET', k('lease'), ARGV[j], now + lease)
  else
    gone[#gone + 1] = ARGV[j]
  end
end
local flat = redis.call('HGETALL', k('lease'))
local expired = false
for j = 1, #flat, 2 do
  if tonumber(flat[j + 1]) < now then
    local m = drop_member(flat[j])
    if m then
      redis.call('PUBLISH', k('ev'), 'k' .. flat[j] .. ' ' .. m.tok)
      expired = true
    end
  end
end
if expired then changed() end
expire_deliveries()
return done(gone)
"""
