-- Statehouse sessions: every operation of `statehouse_core::session::SessionStore` in one atomic
-- step on the Redis server. The expiry rules mirror crates/statehouse-core/src/session.rs
-- (`expires_at`, `is_alive`, `touch_due`) with the same integer arithmetic: times are
-- microseconds since the epoch, integers below 10^16 (16 decimal digits), exact in Lua's
-- doubles.
--
-- Keys (all of one user share the hash tag `{<user tag hex>}`, hence one Cluster slot):
--   {prefix}{<tag>}:<id>   STRING, a session in one compact record:
--                            byte 1      'S' (format 1)
--                            bytes 2-17  created_at µs, 16 zero-padded decimal digits
--                            bytes 18-33 last_seen µs, the same (a touch is one SETRANGE at
--                                        offset 17, nothing decoded)
--                            then fields, each a kind byte, for 'd' a 2-byte big-endian name
--                            length and the name, then a 4-byte big-endian value length and
--                            the value: 'u' user id, 'r' roles joined by "\n" (roles hold no
--                            control characters; '' = none), 'i' ip, 'a' user agent (absent
--                            when unknown), 'd' a data field (raw bytes). Kinds this script
--                            does not know are kept as they are.
--                          or, after a rotation, an alias of the old id (same key name):
--                            'A', the end of the rotation grace (16 digits), the new id (64 hex)
--   {prefix}{<tag>}:idx    ZSET, the user's index: member = session id, score = expires_at µs
-- (Sessions were HASHes before this layout; nothing was released with that one, so there is no
-- migration.) A key of another type, such as one of those HASHes, or a value that does not parse is
-- corrupt data: the call that meets it fails with an error.
-- Every write sets an expiry (PEXPIREAT at the logical expiry, rounded up to the millisecond,
-- plus ARGV[3]); the index expires with its longest-lived member (a load's refresh only
-- lengthens the index's TTL, `PEXPIREAT … GT`, so after a revocation it may outlive its members
-- until the next create, update or rotate sets it from the top score again). Expiry is also
-- enforced here from the stored times, so a session is dead at `now >= expires_at` whatever its
-- TTL says.
--
-- ARGV[1] op: create | load | load_many | update | rotate | revoke | list | revoke_id | revoke_all
-- ARGV[2] now in µs, or '' to read the server's TIME
-- ARGV[3] slack in milliseconds added to every expiry
-- ARGV[4] idle timeout µs, ARGV[5] absolute lifetime µs, ARGV[6] touch_after µs,
-- ARGV[7] rotation grace µs
-- ARGV[8] the user's key base `{prefix}{<tag>}:` (a session key is base .. id)
-- then per op, see each function.
--
-- Status codes in replies: 0 = gone (unknown, revoked, alias past its grace), 1 = done,
-- 2 = found expired (deleted now; the reply carries its id and user for the Expired event),
-- 3 = id collision (create, rotate: the caller draws a new token), 4 = this load of a
-- load_many failed (corrupt data, wrong type): { now, 4, message }.

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

-- Cost notes (this script runs on every request that needs it): in Lua 5.1 every
-- `local function` statement below allocates a closure each time it runs, i.e. on every
-- EVALSHA, and the garbage collector then has to free it. So the load path (`load`,
-- `load_many`) comes first, creates few closures per call (not per load) and returns before the
-- functions of the other operations are made.
local call = redis.call
local tonumber, floor, ceil, format = tonumber, math.floor, math.ceil, string.format
local byte, sub, find = string.byte, string.sub, string.find

local GONE, DONE, EXPIRED, COLLISION, FAILED = 0, 1, 2, 3, 4
-- 'S', 'A', and the field kinds.
local K_SESSION, K_ALIAS = 83, 65
local K_USER, K_ROLES, K_IP, K_AGENT, K_DATA = 117, 114, 105, 97, 100
-- The header of a session: kind byte and two 16-digit times.
local HEADER = 33
-- An alias: kind byte, 16-digit grace end, 64-hex id.
local ALIAS_LEN = 81
-- Times are written as 16 digits: anything from here up cannot be.
local MAX_TIME = 1e16

local function arg_uint(i, what)
  local n = tonumber(ARGV[i])
  if n == nil or n < 0 or n ~= floor(n) then
    error(redis.error_reply('ERR statehouse: argument ' .. what .. ' is not a non-negative integer'))
  end
  return n
end

local function corrupt(key, what)
  error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key .. ': ' .. what))
end

-- The 16-digit time at byte `from` of the record `v`.
local function digits(v, from, key, what)
  local s = sub(v, from, from + 15)
  if #s ~= 16 or not find(s, '^%d+$') then
    corrupt(key, what .. ' is not a 16-digit time')
  end
  return tonumber(s)
end

-- `n` (µs) as the 16 digits of a record.
local function pad(n)
  if n >= MAX_TIME then
    error(redis.error_reply('ERR statehouse: a time past 16 digits of microseconds'))
  end
  return format('%016.0f', n)
end

-- Decodes a session record: { c, s, u, r, i, a, d = { name = value }, x = { unknown fields } }.
-- Fails (an error reply) on anything that is not a whole, well-formed session record. With
-- `light`, only the times and the user are kept (the record is checked just the same): a walk
-- over a user's sessions that needs no more does not copy every data field of every session.
local function decode(v, key, light)
  local n = #v
  if n < HEADER or byte(v, 1) ~= K_SESSION then
    corrupt(key, 'not a session record')
  end
  local f = { c = digits(v, 2, key, 'created_at'), s = digits(v, 18, key, 'last_seen'), d = {}, x = {} }
  local pos = HEADER + 1
  while pos <= n do
    local start, k = pos, byte(v, pos)
    pos = pos + 1
    local name
    if k == K_DATA then
      if pos + 1 > n then
        corrupt(key, 'a data field name is cut short')
      end
      local b1, b2 = byte(v, pos, pos + 1)
      local len = b1 * 256 + b2
      pos = pos + 2
      if pos + len - 1 > n then
        corrupt(key, 'a data field name is cut short')
      end
      if not light then
        name = sub(v, pos, pos + len - 1)
      end
      pos = pos + len
    end
    if pos + 3 > n then
      corrupt(key, 'a field length is cut short')
    end
    local b1, b2, b3, b4 = byte(v, pos, pos + 3)
    local len = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    pos = pos + 4
    if pos + len - 1 > n then
      corrupt(key, 'a field value is cut short')
    end
    local value = (not light or k == K_USER) and sub(v, pos, pos + len - 1)
    pos = pos + len
    if k == K_USER then
      f.u = value
    elseif light then
      -- Only the user is kept.
    elseif k == K_ROLES then
      f.r = value
    elseif k == K_IP then
      f.i = value
    elseif k == K_AGENT then
      f.a = value
    elseif k == K_DATA then
      f.d[name] = value
    else
      f.x[#f.x + 1] = sub(v, start, pos - 1)
    end
  end
  if f.u == nil then
    corrupt(key, 'no user id')
  end
  return f
end

-- load: KEYS[1] = key of the presented id, KEYS[2] = index; ARGV[9] = presented id.
-- Reply { now, 1, id, via_alias, touched, record } or { now, 0 } or the EXPIRED reply
-- { now, 2, id, user }. The record is the stored value as read: when `touched` is 1, its
-- last_seen is the reply's `now` (the record carries the time before the touch).
--
-- load_many: n loads in one call (the store coalesces concurrent loads; on Redis Cluster, of
-- one slot). Each is exactly a `load` of its own, in order, with its own key base and time.
-- KEYS[2i-1], KEYS[2i] = session key and index of load i; ARGV[9] = n, then per load: its key
-- base, its presented id, its now in µs or '' for the server's TIME (read once, ARGV[2] = '').
-- Reply { now, { reply of load 1 }, ... }; a load that fails (corrupt data, wrong type) answers
-- { now, 4, message } without affecting the others.
local now
if ARGV[2] == '' then
  local t = call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = arg_uint(2, 'now')
end
local slack_ms = arg_uint(3, 'slack')
local IDLE = arg_uint(4, 'idle')
local ABSOLUTE = arg_uint(5, 'absolute')
local TOUCH_AFTER = arg_uint(6, 'touch_after')
local GRACE = arg_uint(7, 'rotation_grace')
local base = ARGV[8]
local op = ARGV[1]

if op == 'load_many' or op == 'load' then
  -- One load (see `resolve` below for the rules, which this follows exactly, inlined). `t` is
  -- `now` formatted. Reads the record once (twice via an alias) and, when the touch is due,
  -- writes SETRANGE of last_seen, PEXPIREAT, ZADD and the index's expiry.
  local function load_one(key, idx, id, b, t, tn)
    local v = call('GET', key)
    if not v then
      return { t, GONE }
    end
    local via_alias, alias_key = 0, nil
    if byte(v, 1) == K_ALIAS then
      -- A rotation alias: resolve one hop.
      local g = digits(v, 2, key, 'the alias grace end')
      if tn >= g then
        call('DEL', key)
        return { t, GONE }
      end
      local a = sub(v, 18)
      if #v ~= ALIAS_LEN or not find(a, '^[0-9a-f]+$') then
        corrupt(key, 'the alias target is not a session id')
      end
      alias_key = key
      id = a
      key = b .. id
      v = call('GET', key)
      if not v or byte(v, 1) == K_ALIAS then
        call('DEL', alias_key)
        return { t, GONE }
      end
      via_alias = 1
    end
    if #v < HEADER or byte(v, 1) ~= K_SESSION then
      corrupt(key, 'not a session record')
    end
    local cn = digits(v, 2, key, 'created_at')
    local sn = digits(v, 18, key, 'last_seen')
    local lifetime_end = cn + ABSOLUTE
    local idle_end = sn + IDLE
    if tn >= (idle_end < lifetime_end and idle_end or lifetime_end) then
      -- Dead: delete it (and the alias it was reached through), drop it from the index.
      local u = decode(v, key).u
      call('DEL', key)
      if alias_key then
        call('DEL', alias_key)
      end
      call('ZREM', idx, id)
      return { t, EXPIRED, id, u }
    end
    local touched = 0
    if tn >= sn + TOUCH_AFTER then
      -- The refresh: last_seen, the key's expiry, the index score and the index's expiry.
      call('SETRANGE', key, 17, pad(tn))
      idle_end = tn + IDLE
      local exp = idle_end < lifetime_end and idle_end or lifetime_end
      local exp_ms = format('%.0f', ceil(exp / 1000) + slack_ms)
      call('PEXPIREAT', key, exp_ms)
      if call('ZADD', idx, format('%.0f', exp), id) == 0 then
        -- The member was there, so the index existed and has a TTL (every write sets one):
        -- lengthen it if this member now outlives it. Redis < 7 has no GT: the long way.
        local r = redis.pcall('PEXPIREAT', idx, exp_ms, 'GT')
        if type(r) == 'table' and r.err then
          local top = call('ZRANGE', idx, -1, -1, 'WITHSCORES')
          call('PEXPIREAT', idx, format('%.0f', ceil(tonumber(top[2]) / 1000) + slack_ms))
        end
      else
        -- A new member, perhaps of a new index (no TTL yet): the index lives as long as its
        -- longest-lived member.
        local top = call('ZRANGE', idx, -1, -1, 'WITHSCORES')
        call('PEXPIREAT', idx, format('%.0f', ceil(tonumber(top[2]) / 1000) + slack_ms))
      end
      touched = 1
    end
    return { t, DONE, id, via_alias, touched, v }
  end

  local server_t = format('%.0f', now)
  if op == 'load' then
    return load_one(KEYS[1], KEYS[2], ARGV[9], base, server_t, now)
  end
  local n = arg_uint(9, 'the number of loads')
  local out = { server_t }
  for i = 1, n do
    local at = 7 + 3 * i
    local t, tn = server_t, now
    if ARGV[at + 2] ~= '' then
      tn = arg_uint(at + 2, 'now')
      t = format('%.0f', tn)
    end
    local ok, reply = pcall(load_one, KEYS[2 * i - 1], KEYS[2 * i], ARGV[at + 1], ARGV[at], t, tn)
    if ok then
      out[i + 1] = reply
    else
      out[i + 1] = { t, FAILED, type(reply) == 'table' and reply.err or tostring(reply) }
    end
  end
  return out
end

-- The other operations, each one call: not the hot path.

local function raise(msg)
  error(redis.error_reply('ERR statehouse: ' .. msg))
end

-- Never let Lua turn a number into a string by itself ('%.14g' would write 1.7e+15).
local function fmt(n)
  return format('%.0f', n)
end

-- A 4-byte big-endian length.
local function len4(n)
  return string.char(floor(n / 16777216) % 256, floor(n / 65536) % 256, floor(n / 256) % 256,
    n % 256)
end

-- A field of a record: kind, 4-byte big-endian length, value.
local function field(kind, value)
  return string.char(kind) .. len4(#value) .. value
end

-- Encodes a decoded (and perhaps changed) session record; data fields in name order.
local function encode(f)
  local parts = { string.char(K_SESSION), pad(f.c), pad(f.s), field(K_USER, f.u) }
  if f.r ~= nil then
    parts[#parts + 1] = field(K_ROLES, f.r)
  end
  if f.i ~= nil then
    parts[#parts + 1] = field(K_IP, f.i)
  end
  if f.a ~= nil then
    parts[#parts + 1] = field(K_AGENT, f.a)
  end
  local names = {}
  for name in pairs(f.d) do
    names[#names + 1] = name
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local n, value = #name, f.d[name]
    parts[#parts + 1] = string.char(K_DATA, floor(n / 256), n % 256) .. name .. len4(#value) .. value
  end
  for _, raw in ipairs(f.x) do
    parts[#parts + 1] = raw
  end
  return table.concat(parts)
end

local function expires_at(c, s)
  return math.min(s + IDLE, c + ABSOLUTE)
end

local function expire_key_at(key, us)
  call('PEXPIREAT', key, fmt(ceil(us / 1000) + slack_ms))
end

-- The index lives as long as its longest-lived member (scores only ever grow: a session's
-- expiry never moves backwards).
local function expire_index(idx)
  local top = call('ZRANGE', idx, -1, -1, 'WITHSCORES')
  if top[2] then
    expire_key_at(idx, tonumber(top[2]))
  end
end

-- Reads the session a presented id stands for, following a rotation alias one hop: a live
-- alias (within its grace) whose target holds a session resolves to that session. Returns nil
-- when nothing resolves, deleting the dead alias met on the way (past its grace, its target
-- gone, or its target itself an alias: aliases resolve one hop only). Else a table: key, id,
-- f (the decoded record), via_alias, alias_key.
local function resolve(key, id)
  local v = call('GET', key)
  if not v then
    return nil
  end
  local via_alias, alias_key = 0, nil
  if byte(v, 1) == K_ALIAS then
    local grace_end = digits(v, 2, key, 'the alias grace end')
    if now >= grace_end then
      call('DEL', key)
      return nil
    end
    local a = sub(v, 18)
    if #v ~= ALIAS_LEN or not find(a, '^[0-9a-f]+$') then
      corrupt(key, 'the alias target is not a session id')
    end
    alias_key = key
    id = a
    key = base .. id
    v = call('GET', key)
    if not v or byte(v, 1) == K_ALIAS then
      call('DEL', alias_key)
      return nil
    end
    via_alias = 1
  end
  return { key = key, id = id, f = decode(v, key), via_alias = via_alias, alias_key = alias_key }
end

-- Deletes a session found dead (and the alias it was reached through) and drops it from the
-- index.
local function bury(idx, sess)
  call('DEL', sess.key)
  if sess.alias_key then
    call('DEL', sess.alias_key)
  end
  call('ZREM', idx, sess.id)
  return { fmt(now), EXPIRED, sess.id, sess.f.u }
end

-- Sets the key's expiry, the index score and the index expiry for a session last seen now.
local function refresh_expiry(idx, key, id, c)
  local exp = expires_at(c, now)
  expire_key_at(key, exp)
  call('ZADD', idx, fmt(exp), id)
  expire_index(idx)
end

-- Reads the index `idx` in score order (the first to expire first; ties by id) and writes
-- nothing: returns the members to drop (key gone, or an alias), the ids of dead sessions, the
-- dead ones as a flat list id, user (for the Expired events), and the live sessions of `user`
-- as { id, key, record } (with `light`, records holding only times and user). A corrupt record
-- fails the call here, before any write.
local function survey(idx, user, light)
  local stale, dead, expired, live = {}, {}, {}, {}
  for _, id in ipairs(call('ZRANGE', idx, 0, -1)) do
    local key = base .. id
    local v = call('GET', key)
    if not v or byte(v, 1) == K_ALIAS then
      stale[#stale + 1] = id
    else
      local f = decode(v, key, light)
      if now >= expires_at(f.c, f.s) then
        dead[#dead + 1] = id
        expired[#expired + 1] = id
        expired[#expired + 1] = f.u
      elseif f.u == user then
        live[#live + 1] = { id, key, f }
      end
    end
  end
  return stale, dead, expired, live
end

-- Applies a survey's pruning: drops the stale members and deletes the dead sessions.
local function prune(idx, stale, dead)
  for _, id in ipairs(stale) do
    call('ZREM', idx, id)
  end
  for _, id in ipairs(dead) do
    call('DEL', base .. id)
    call('ZREM', idx, id)
  end
end

-- Walks the index `idx`: prunes it, then calls `each(id, key, f)` for each live session of
-- `user`, first to expire first (`light`: see `survey`). Returns the expired ones as a flat list
-- id, user.
local function walk(idx, user, each, light)
  local stale, dead, expired, live = survey(idx, user, light)
  prune(idx, stale, dead)
  for _, s in ipairs(live) do
    each(s[1], s[2], s[3])
  end
  return expired
end

-- create: KEYS[1] = session key, KEYS[2] = index; ARGV[9] = id, ARGV[10] = the record's fields
-- (everything after the header; the times are set here), ARGV[11] = user id, ARGV[12] = the
-- most live sessions a user may have. Never overwrites: an existing key is a collision. A user
-- at that bound loses the sessions first to expire (index scores are expiries; ties by id):
-- normally the least recently active, near the absolute lifetime the oldest. In this same step.
-- Reply { now, 1, { evicted ids, first to expire first }, { expired id, user ... } }.
local function create()
  local key, idx, id = KEYS[1], KEYS[2], ARGV[9]
  if call('EXISTS', key) == 1 then
    return { fmt(now), COLLISION }
  end
  local cap = arg_uint(12, 'the most sessions per user')
  local stale, dead, expired, live = {}, {}, {}, {}
  if call('ZCARD', idx) >= cap then
    -- Only at the bound: the user's live sessions, first to expire first (a tag is the user's,
    -- barring a 64-bit hash collision). Read before any write, so corrupt data fails the
    -- create with nothing changed.
    stale, dead, expired, live = survey(idx, ARGV[11], true)
  end
  -- The record is the first write: on a Redis at its maxmemory it is refused before the script
  -- has changed anything (a script that has written once may go on writing).
  local t = pad(now)
  call('SET', key, string.char(K_SESSION) .. t .. t .. ARGV[10])
  local exp = expires_at(now, now)
  expire_key_at(key, exp)
  -- Members whose score has passed are dead (scores are expiries and never move back).
  call('ZREMRANGEBYSCORE', idx, '-inf', fmt(now))
  prune(idx, stale, dead)
  local evicted = {}
  for i = 1, #live + 1 - cap do
    call('DEL', live[i][2])
    call('ZREM', idx, live[i][1])
    evicted[i] = live[i][1]
  end
  call('ZADD', idx, fmt(exp), id)
  expire_index(idx)
  return { fmt(now), DONE, evicted, expired }
end

-- update: KEYS[1], KEYS[2] as load; ARGV[9] = presented id, ARGV[10] = '1' to replace the
-- roles by ARGV[11], ARGV[12] = number of fields to set, then that many name/value pairs of
-- data fields, then the names of the data fields to delete. Writes only to a live session; the
-- record is decoded, changed field by field and written back in this one atomic step, so
-- concurrent updates of other fields are never lost. Reply { now, 1, via_alias (1 when the
-- presented id was a rotation alias) }.
local function update()
  local idx = KEYS[2]
  local sess = resolve(KEYS[1], ARGV[9])
  if sess == nil then
    return { fmt(now), GONE }
  end
  local f = sess.f
  if now >= expires_at(f.c, f.s) then
    return bury(idx, sess)
  end
  if ARGV[10] == '1' then
    f.r = ARGV[11]
  end
  -- Removals first, then sets: a field named in both ends up set.
  local n_set = arg_uint(12, 'the number of fields to set')
  local first_del = 13 + 2 * n_set
  for i = first_del, #ARGV do
    f.d[ARGV[i]] = nil
  end
  for i = 13, first_del - 1, 2 do
    f.d[ARGV[i]] = ARGV[i + 1]
  end
  f.s = now
  call('SET', sess.key, encode(f))
  refresh_expiry(idx, sess.key, sess.id, f.c)
  return { fmt(now), DONE, sess.via_alias }
end

-- rotate: KEYS[1], KEYS[2] as load, KEYS[3] = key of the new id; ARGV[9] = presented id,
-- ARGV[10] = new id. Via a live alias, the alias's target is rotated; the presented alias then
-- points at an alias, so it is dead (one hop). Reply { now, 1, old id, record of the new
-- session }.
local function rotate()
  local idx, new_key, new_id = KEYS[2], KEYS[3], ARGV[10]
  local sess = resolve(KEYS[1], ARGV[9])
  if sess == nil then
    return { fmt(now), GONE }
  end
  local f = sess.f
  if now >= expires_at(f.c, f.s) then
    return bury(idx, sess)
  end
  if call('RENAMENX', sess.key, new_key) == 0 then
    return { fmt(now), COLLISION }
  end
  call('SETRANGE', new_key, 17, pad(now))
  refresh_expiry(idx, new_key, new_id, f.c)
  call('ZREM', idx, sess.id)
  if GRACE > 0 then
    local grace_end = now + GRACE
    call('SET', sess.key, string.char(K_ALIAS) .. pad(grace_end) .. new_id)
    expire_key_at(sess.key, grace_end)
  end
  return { fmt(now), DONE, sess.id, call('GET', new_key) }
end

-- revoke: KEYS[1], KEYS[2] as load; ARGV[9] = presented id. Via a live alias, revokes the
-- target and deletes the alias. Reply { now, status, id, user }. Other aliases of a revoked
-- session are dead from then on (their target is gone) and are deleted when next met.
local function revoke()
  local idx = KEYS[2]
  local sess = resolve(KEYS[1], ARGV[9])
  if sess == nil then
    return { fmt(now), GONE }
  end
  if now >= expires_at(sess.f.c, sess.f.s) then
    return bury(idx, sess)
  end
  if sess.alias_key then
    call('DEL', sess.alias_key)
  end
  call('DEL', sess.key)
  call('ZREM', idx, sess.id)
  return { fmt(now), DONE, sess.id, sess.f.u }
end


-- list: KEYS[1] = index; ARGV[9] = user id. Reply { now, { per session: id, created_at,
-- last_seen, has_ip, ip, has_ua, ua ... }, { expired id, user ... } }.
local function list()
  local out = {}
  local expired = walk(KEYS[1], ARGV[9], function(id, _, f)
    out[#out + 1] = id
    out[#out + 1] = fmt(f.c)
    out[#out + 1] = fmt(f.s)
    out[#out + 1] = f.i and 1 or 0
    out[#out + 1] = f.i or ''
    out[#out + 1] = f.a and 1 or 0
    out[#out + 1] = f.a or ''
  end)
  return { fmt(now), out, expired }
end

-- revoke_all: KEYS[1] = index; ARGV[9] = user id, ARGV[10] = id to keep or ''. A kept id that
-- is a live rotation alias keeps the session it points at: a request that loaded its session
-- before a concurrent rotation keeps the current device. Reply { now, { revoked ids },
-- { expired id, user ... } }.
local function revoke_all()
  local idx, keep = KEYS[1], ARGV[10]
  if keep ~= '' then
    local kept = resolve(base .. keep, keep)
    if kept then
      keep = kept.id
    end
  end
  local revoked = {}
  local expired = walk(KEYS[1], ARGV[9], function(id, key)
    if id ~= keep then
      call('DEL', key)
      call('ZREM', idx, id)
      revoked[#revoked + 1] = id
    end
  end, true)
  return { fmt(now), revoked, expired }
end

-- revoke_id: KEYS[1] = session key, KEYS[2] = index; ARGV[9] = id, ARGV[10] = user id.
-- Only a live session of that user is revoked; an alias is not a session. Reply { now, status,
-- id, user }.
local function revoke_id()
  local key, idx, id, user = KEYS[1], KEYS[2], ARGV[9], ARGV[10]
  local v = call('GET', key)
  if not v or byte(v, 1) == K_ALIAS then
    call('ZREM', idx, id)
    return { fmt(now), GONE }
  end
  local f = decode(v, key)
  if now >= expires_at(f.c, f.s) then
    call('DEL', key)
    call('ZREM', idx, id)
    return { fmt(now), EXPIRED, id, f.u }
  end
  if f.u ~= user then
    return { fmt(now), GONE }
  end
  call('DEL', key)
  call('ZREM', idx, id)
  return { fmt(now), DONE, id, f.u }
end

local ops = {
  create = create,
  update = update,
  rotate = rotate,
  revoke = revoke,
  list = list,
  revoke_all = revoke_all,
  revoke_id = revoke_id,
}
local run = ops[op]
if run == nil then
  raise('unknown session operation ' .. tostring(op))
end
return run()
