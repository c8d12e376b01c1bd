"""The Lua scripts that change a queue in Redis: each operation of the seam is one script.

Strategy: a script runs atomically in Redis, so an operation that touches several keys (a put's
index, entry and requestId; a commit's delete in every group; a truncate) is never half-done,
whatever happens to the node that sent it. With ``appendfsync always`` Redis writes a script's
effects to its AOF and fsyncs before it replies, so a reply means durable. Every script gets the
queue's hash tag as ``KEYS[1]`` and derives the other key names from it (`keys` documents them;
all in one Cluster slot). Shared functions are in `PRELUDE`, prepended to each script. The clock is
Redis's (``TIME``), so consumers' idle times and leases agree across nodes. Every script's first
argument is the calling node's id (the prelude takes it off ``ARGV``), which the events it
publishes carry: a node wakes its own watchers itself, before the reply is used, and skips the
echo.

The delivery policies' shared functions are in `policies`, prepended (`WITH_POLICIES`) only to
the scripts that apply them.

The consumer groups' operations (deliver, commit, negative, attach, release, lease) are in
`group_scripts`; the stored consumer-group state they share with these (``o:<G>`` and the rest) is
described there.
"""

from __future__ import annotations

from qserve.backends.redis.policies import POLICIES

__all__ = ["PRELUDE", "WITH_POLICIES", "PUT", "READ", "DELETE", "TRUNCATE", "END", "COUNT", "SEARCH", "STATE",
           "CREATE", "LETTERS", "REPLAY"]

PRELUDE = r"""
local T = KEYS[1]
local NODE = table.remove(ARGV, 1)   -- the calling node's id: it skips its own events
local function k(s) return T .. ':' .. s end
local function changed() redis.call('PUBLISH', k('ev'), 'c' .. NODE) end
local function sid(i) return string.format('%d-0', i) end
local function idx_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function fields(flat)
  local f = {}
  for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
  return f
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function prio_member(p, i) return string.format('%08x%016x', 2147483647 - p, i) end
local function entry(i)
  local e = redis.call('XRANGE', k('s'), sid(i), sid(i))
  if #e == 0 then return nil end
  return fields(e[1][2])
end
-- does the entry's tags (msgpack map) include every pair of the flat filter list?
local function matches(packed, filter)
  if #filter == 0 then return true end
  local tags = cmsgpack.unpack(packed)
  for j = 1, #filter, 2 do
    if tags[filter[j]] ~= filter[j + 1] then return false end
  end
  return true
end
local function groups() return redis.call('SMEMBERS', k('gs')) end
local function held_anywhere(i)
  for _, g in ipairs(groups()) do
    if redis.call('HEXISTS', k('o:' .. g), i) == 1 then return true end
  end
  return false
end
-- a requestId names its newest live entry (`r`); older live ones with the same id wait in `rr`
local function older_copies(rid)
  local packed = redis.call('HGET', k('rr'), rid)
  if packed then return cmsgpack.unpack(packed) end
  return {}
end
local function keep_older_copies(rid, list)
  if #list == 0 then redis.call('HDEL', k('rr'), rid) else redis.call('HSET', k('rr'), rid, cmsgpack.pack(list)) end
end
local function remember_request_id(rid, i)
  local newest = tonumber(redis.call('HGET', k('r'), rid))
  if newest then
    local list = older_copies(rid)
    list[#list + 1] = newest
    keep_older_copies(rid, list)
  end
  redis.call('HSET', k('r'), rid, i)
end
local function forget_request_id(rid, i)
  local list = older_copies(rid)
  if redis.call('HGET', k('r'), rid) == tostring(i) then
    if #list == 0 then redis.call('HDEL', k('r'), rid) return end
    redis.call('HSET', k('r'), rid, table.remove(list))
  else
    for j = #list, 1, -1 do
      if list[j] == i then table.remove(list, j) end
    end
  end
  keep_older_copies(rid, list)
end
-- GONE in every group: the entry, its priority slot, requestId, annotations, holders' slots
-- does the queue keep any per-entry policy state (`policies`: dc, dead, dly, dt)? Asked once a
-- call, so a queue without policies pays one EXISTS per script, not four calls per entry; the
-- policy functions that write such state set it
local KEPT = nil
local function policy_state()
  if KEPT == nil then KEPT = redis.call('EXISTS', k('dc'), k('dead'), k('dly'), k('dt')) > 0 end
  return KEPT
end
local function remove(i)
  local f = entry(i)
  if f == nil then return 0 end
  redis.call('XDEL', k('s'), sid(i))
  if f.p then redis.call('ZREM', k('p'), prio_member(tonumber(f.p), i)) end
  if f.i then forget_request_id(f.i, i) end
  redis.call('HDEL', k('n'), i)
  local kept = policy_state()
  if kept then
    redis.call('HDEL', k('dc'), i)
    redis.call('HDEL', k('dead'), i)
    local delays = redis.call('HGET', k('dly'), i)
    if delays then
      for g, _ in pairs(cmsgpack.unpack(delays)) do redis.call('ZREM', k('dz'), i .. ':' .. g) end
      redis.call('HDEL', k('dly'), i)
    end
  end
  for _, g in ipairs(groups()) do
    local c = redis.call('HGET', k('o:' .. g), i)
    if c then
      redis.call('HDEL', k('o:' .. g), i)
      redis.call('HINCRBY', k('h'), c, -1)
      if kept then redis.call('ZREM', k('dt'), i .. ':' .. g) end
    end
    redis.call('HDEL', k('a:' .. g), i)
  end
  return 1
end
-- a new entry at the next index (the queue's counter never goes back); its put event published
local function append(data, tags, p, rid)
  local n = redis.call('HINCRBY', k('m'), 'last', 1)
  local fields = {'d', data, 't', tags}
  if rid ~= '' then
    fields[#fields + 1] = 'i'
    fields[#fields + 1] = rid
  end
  if p > 0 then
    fields[#fields + 1] = 'p'
    fields[#fields + 1] = p
    redis.call('ZADD', k('p'), 0, prio_member(p, n))
  end
  redis.call('XADD', k('s'), sid(n), unpack(fields))
  if rid ~= '' then remember_request_id(rid, n) end
  redis.call('PUBLISH', k('ev'), 'p' .. NODE .. ' ' .. n .. ' ' .. tags)
  return n
end
local function annotated(i, f)
  return {i, f.d, f.t, f.p or '0', redis.call('HGET', k('n'), i) or ''}
end
-- the dispatch order from `start`: priority entries (highest first), then the others by index;
-- calls visit(i, f) until it returns true (stop)
local function walk(start, visit)
  local off = 0
  while true do
    local ms = redis.call('ZRANGEBYLEX', k('p'), '-', '+', 'LIMIT', off, 128)
    for _, mem in ipairs(ms) do
      local i = tonumber(string.sub(mem, 9), 16)
      if i >= start then
        local f = entry(i)
        if f and visit(i, f) then return end
      end
    end
    if #ms < 128 then break end
    off = off + #ms
  end
  local from = math.max(start, 1)
  while true do
    local es = redis.call('XRANGE', k('s'), sid(from), '+', 'COUNT', 128)
    for _, e in ipairs(es) do
      local f = fields(e[2])
      if not f.p and visit(idx_of(e[1]), f) then return end
    end
    if #es < 128 then return end
    from = idx_of(es[#es][1]) + 1
  end
end
"""

#: prepended (after `PRELUDE`) to the scripts that apply the delivery policies: the policies' functions
#: (`policies`) and giving back a leaving consumer's entries, which applies them; the other scripts
#: do without (a script's chunk defines its functions on every call)
WITH_POLICIES = POLICIES + r"""
-- the consumer leaves: what it holds is AVAILABLE to its group again; an emptied group goes
local function drop_member(cid)
  local rec = redis.call('HGET', k('c'), cid)
  if not rec then return nil end
  local m = cmsgpack.unpack(rec)
  local g = m.g
  local released = {}
  for _, name in ipairs({'o:' .. g, 'a:' .. g}) do
    local flat = redis.call('HGETALL', k(name))
    for j = 1, #flat, 2 do
      if flat[j + 1] == cid then
        redis.call('HDEL', k(name), flat[j])
        if name == 'o:' .. g then released[#released + 1] = tonumber(flat[j]) end
      end
    end
  end
  redis.call('HDEL', k('c'), cid)
  redis.call('HDEL', k('h'), cid)
  redis.call('HDEL', k('la'), cid)
  redis.call('HDEL', k('lease'), cid)
  redis.call('HDEL', k('cs'), cid .. ':d', cid .. ':l')
  redis.call('SREM', k('gm:' .. g), cid)
  if redis.call('SCARD', k('gm:' .. g)) == 0 then
    redis.call('DEL', k('o:' .. g), k('a:' .. g), k('gi:' .. g))
    redis.call('SREM', k('gs'), g)
  end
  for _, i in ipairs(released) do
    redis.call('ZREM', k('dt'), i .. ':' .. g)
    returned(g, i, nil)
  end
  return m
end
"""

#: a batch of puts (`queue.PutBatcher`), each as the put alone would be, in order. ARGV: max length,
#: trim oldest (0/1), dedup window ms (0: off), the node's wall clock ms, at most this many
#: requestIds remembered, then per put: payload, tags (msgpack), priority, requestId, unique (1: the
#: requestId is the client's and the window applies) -> per put: {index, 0}; {the original index,
#: 1} a duplicate within the window; -1 ended; -2 full
PUT = WITH_POLICIES + r"""
local maxlen, trim, window = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local now, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local function put(data, tags, p, rid, unique)
  local windowed = unique and window > 0 and rid ~= ''
  if windowed then
    local original = seen_within(rid, now - window)
    if original then return {original, 1} end
  end
  if redis.call('HGET', k('m'), 'state') == 'End' then return -1 end
  while redis.call('XLEN', k('s')) >= maxlen do
    if not trim then return -2 end
    local first = redis.call('XRANGE', k('s'), '-', '+', 'COUNT', 1)
    remove(idx_of(first[1][1]))
  end
  local n = append(data, tags, p, rid)
  if windowed then remember_put(rid, n, now, limit) end
  return {n, 0}
end
local out = {}
for j = 6, #ARGV, 5 do
  out[#out + 1] = put(ARGV[j], ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[j + 3], ARGV[j + 4] == '1')
end
return out
"""

#: (on a dead-letter queue) ARGV: indexes... -> {index, tags (msgpack)} of each one it holds
LETTERS = r"""
local out = {}
for j = 1, #ARGV do
  local f = entry(tonumber(ARGV[j]))
  if f then out[#out + 1] = {tonumber(ARGV[j]), f.t} end
end
return out
"""

#: (on a dead-letter queue, KEYS[2] the prefix of the queue its letters go back to: in its slot,
#: but for a sink on a Cluster) ARGV: the node's wall clock ms, dedup window ms (0: off), at most
#: this many requestIds remembered, max length, trim oldest (0/1), then per letter: its index
#: here, its tags as replayed (msgpack), its requestId -> {{index here, new index, priority}...};
#: {-1, indexes...} the ones not here (nothing done); -2 that queue ended; -3 it is full. Each
#: letter is appended there (data, priority, tags; the dedup window's requestId re-keyed to the
#: new index) and removed here, all in this one atomic step
REPLAY = WITH_POLICIES + r"""
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxlen, trim = tonumber(ARGV[4]), ARGV[5] == '1'
local DLQ, ORIGIN = T, KEYS[2]
local letters, missing = {}, {}
for j = 6, #ARGV, 3 do
  local d = tonumber(ARGV[j])
  local f = entry(d)
  if f then letters[#letters + 1] = {d, f, ARGV[j + 1], ARGV[j + 2]} else missing[#missing + 1] = d end
end
if #missing > 0 then return {-1, unpack(missing)} end
T = ORIGIN
if redis.call('HGET', k('m'), 'state') == 'End' then return -2 end
if not trim and redis.call('XLEN', k('s')) + #letters > maxlen then return -3 end
local out = {}
for _, letter in ipairs(letters) do
  local d, f, tags, rid = letter[1], letter[2], letter[3], letter[4]
  T, KEPT = ORIGIN, nil   -- `remove` asks each queue of its own policy state
  while redis.call('XLEN', k('s')) >= maxlen do
    local first = redis.call('XRANGE', k('s'), '-', '+', 'COUNT', 1)
    remove(idx_of(first[1][1]))
  end
  local p = tonumber(f.p or '0')
  local n = append(f.d, tags, p, rid)
  if window > 0 and rid ~= '' then
    seen_within(rid, now - window)
    remember_put(rid, n, now, limit)
  end
  T, KEPT = DLQ, nil
  remove(d)
  out[#out + 1] = {d, n, p}
end
changed()
return out
"""

#: ARGV: start, limit, delete (0/1), requestId ('' = none), filter pairs...
#: -> entries [index, payload, tags, priority, annotations]
READ = r"""
local start, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local filter = {}
for j = 5, #ARGV do filter[#filter + 1] = ARGV[j] end
local out = {}
if ARGV[4] ~= '' then
  local i = tonumber(redis.call('HGET', k('r'), ARGV[4]))
  if i and i >= start then
    local f = entry(i)
    if f and matches(f.t, filter) then out[1] = annotated(i, f) end
  end
else
  local from = math.max(start, 1)
  while #out < limit do
    local es = redis.call('XRANGE', k('s'), sid(from), '+', 'COUNT', math.max(limit, 128))
    for _, e in ipairs(es) do
      local f = fields(e[2])
      if matches(f.t, filter) then
        out[#out + 1] = annotated(idx_of(e[1]), f)
        if #out >= limit then break end
      end
    end
    if #es < math.max(limit, 128) then break end
    from = idx_of(es[#es][1]) + 1
  end
end
if ARGV[3] == '1' and #out > 0 then
  for _, e in ipairs(out) do remove(e[1]) end
  changed()
end
return out
"""

#: ARGV: indexes... -> how many were live
DELETE = r"""
local n = 0
for j = 1, #ARGV do n = n + remove(tonumber(ARGV[j])) end
if n > 0 then changed() end
return n
"""

#: ARGV: below -> how many were live
TRUNCATE = r"""
local below, n = tonumber(ARGV[1]), 0
while below > 1 do
  local es = redis.call('XRANGE', k('s'), '-', sid(below - 1), 'COUNT', 256)
  if #es == 0 then break end
  for _, e in ipairs(es) do n = n + remove(idx_of(e[1])) end
end
if n > 0 then changed() end
return n
"""

#: ARGV: force (0/1) -> entries deleted
END = r"""
redis.call('HSET', k('m'), 'state', 'End')
local n = 0
if ARGV[1] == '1' then
  local doomed = {}
  walk(0, function(i, f)
    if not held_anywhere(i) then doomed[#doomed + 1] = i end
    return false
  end)
  for _, i in ipairs(doomed) do n = n + remove(i) end
end
changed()
return n
"""

#: ARGV: priority (-1 = any), filter pairs... -> live entries matching
COUNT = r"""
local prio = tonumber(ARGV[1])
local filter = {}
for j = 2, #ARGV do filter[#filter + 1] = ARGV[j] end
if prio == -1 and #filter == 0 then return redis.call('XLEN', k('s')) end
local n = 0
walk(0, function(i, f)
  if (prio == -1 or tonumber(f.p or '0') == prio) and matches(f.t, filter) then n = n + 1 end
  return false
end)
return n
"""

#: ARGV: index -> nil (not live), {1, 0} pending somewhere, {0, waiting entries ahead}
SEARCH = r"""
local target = tonumber(ARGV[1])
if target < 1 or entry(target) == nil then return nil end
if held_anywhere(target) then return {1, 0} end
local ahead = 0
walk(0, function(i, f)
  if i == target then return true end
  if not held_anywhere(i) then ahead = ahead + 1 end
  return false
end)
return {0, ahead}
"""

#: ARGV: (optional) the node's policy clock ms, to count the entries a delay hides now (an 8th item)
#: -> {state, length, first and last live index (0: none), now, {consumer rows}, {group rows}}; a
#: consumer row: id, record,
#: held, last active, delivered, last index; a group row: name, pending, delivered, last index, members
STATE = r"""
local first = redis.call('XRANGE', k('s'), '-', '+', 'COUNT', 1)
local newest = redis.call('XREVRANGE', k('s'), '+', '-', 'COUNT', 1)
local consumers = {}
local flat = redis.call('HGETALL', k('c'))
for j = 1, #flat, 2 do
  local cid = flat[j]
  consumers[#consumers + 1] = {cid, flat[j + 1], redis.call('HGET', k('h'), cid) or '0',
    redis.call('HGET', k('la'), cid) or '0', redis.call('HGET', k('cs'), cid .. ':d') or '0',
    redis.call('HGET', k('cs'), cid .. ':l') or '0'}
end
local rows = {}
for _, g in ipairs(groups()) do
  rows[#rows + 1] = {g, redis.call('HLEN', k('o:' .. g)), redis.call('HGET', k('gi:' .. g), 'd') or '0',
    redis.call('HGET', k('gi:' .. g), 'l') or '0', redis.call('SCARD', k('gm:' .. g))}
end
local firstIndex, lastIndex = 0, 0
if #first > 0 then firstIndex, lastIndex = idx_of(first[1][1]), idx_of(newest[1][1]) end
local out = {redis.call('HGET', k('m'), 'state') or 'Normal', redis.call('XLEN', k('s')), firstIndex, lastIndex,
  now_ms(), consumers, rows}
if ARGV[1] then
  local seen, hidden = {}, 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', k('dz'), '(' .. ARGV[1], '+inf')) do
    local i = string.match(member, '^(%d+):')
    if not seen[i] then
      seen[i] = true
      hidden = hidden + 1
    end
  end
  out[#out + 1] = hidden
end
return out
"""

#: -> 1 if the queue was created now, 0 if it existed
CREATE = r"""
return redis.call('HSETNX', k('m'), 'created', now_ms())
"""
