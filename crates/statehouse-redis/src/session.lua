-- Statehouse sessions: every operation of `statehouse_core::session::SessionStore` in one atomic
-- step on the Redis server. The expiry rules mirror crates/statehouse-core/src/session.rs
-- (`expires_at`, `is_alive`, `touch_due`) with the same integer arithmetic: times are
-- microseconds since the epoch, integers below 2^53, exact in Lua's doubles.
--
-- Keys (all of one user share the hash tag `{<user tag hex>}`, hence one Cluster slot):
--   {prefix}{<tag>}:<id>   HASH, a session:
--                            u = user id, r = roles joined by "\n" (roles hold no control
--                            characters; '' = none), c = created_at µs, s = last_seen µs,
--                            ip, ua (absent when unknown), d:<name> = a data field (raw bytes)
--                          or, after a rotation, an alias of the old id (same key name):
--                            a = the new id, g = end of the rotation grace (µs)
--   {prefix}{<tag>}:idx    ZSET, the user's index: member = session id, score = expires_at µs
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

-- Cost notes (this script runs on every request): in Lua 5.1 every `local function` statement
-- below allocates a closure each time it runs, i.e. on every EVALSHA, and the garbage collector
-- then has to free it. So the load path (`load`, `load_many`) comes first, creates two closures
-- per call (not per load) and returns before the functions of the other operations are made.
local call = redis.call
local tonumber, floor, ceil, find, format = tonumber, math.floor, math.ceil, string.find, string.format

local GONE, DONE, EXPIRED, COLLISION, FAILED = 0, 1, 2, 3, 4
-- Fields per HSET / HDEL call: far below the Lua stack limit that `unpack` runs into.
local CHUNK = 256

local function arg_uint(i, what)
  local n = tonumber(ARGV[i])
  if n == nil or n < 0 or n ~= floor(n) then
    error(redis.error_reply('ERR statehouse: argument ' .. what .. ' is not a non-negative integer'))
  end
  return n
end

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

-- load: KEYS[1] = key of the presented id, KEYS[2] = index; ARGV[9] = presented id.
-- Reply { now, 1, id, via_alias, touched, { flat fields (HGETALL) } } or { now, 0 } or the
-- EXPIRED reply { now, 2, id, user }.
--
-- load_many: n loads in one call (the store coalesces concurrent loads; on Redis Cluster, of
-- one slot). Each is exactly a `load` of its own, in order, with its own key base and time.
-- KEYS[2i-1], KEYS[2i] = session key and index of load i; ARGV[9] = n, then per load: its key
-- base, its presented id, its now in µs or '' for the server's TIME (read once, ARGV[2] = '').
-- Reply { now, { reply of load 1 }, ... }; a load that fails (corrupt data, wrong type) answers
-- { now, 4, message } without affecting the others.
if op == 'load_many' or op == 'load' then
  -- One load (see `resolve` below for the rules, which this follows exactly, inlined). `t` is
  -- `now` formatted. Reads the hash once (HGETALL, twice via an alias) and, when the touch is
  -- due, writes HSET, PEXPIREAT, ZADD and the index's expiry.
  local function load_one(key, idx, id, b, t, tn)
    local flat = call('HGETALL', key)
    if #flat == 0 then
      return { t, GONE }
    end
    local via_alias, alias_key = 0, nil
    local u, c, s, si, a, g
    for i = 1, #flat, 2 do
      local f = flat[i]
      if f == 's' then
        s, si = flat[i + 1], i + 1
      elseif f == 'c' then
        c = flat[i + 1]
      elseif f == 'u' then
        u = flat[i + 1]
      elseif f == 'a' then
        a = flat[i + 1]
      elseif f == 'g' then
        g = flat[i + 1]
      end
    end
    if a ~= nil then
      -- A rotation alias: resolve one hop.
      if not (type(g) == 'string' and #g <= 16 and find(g, '^%d+$')) then
        error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key ..
          ': the alias grace end is not a non-negative integer'))
      end
      if tn >= tonumber(g) then
        call('DEL', key)
        return { t, GONE }
      end
      if not (#a == 64 and find(a, '^[0-9a-f]+$')) then
        error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key ..
          ': the alias target is not a session id'))
      end
      alias_key = key
      id = a
      key = b .. id
      flat = call('HGETALL', key)
      if #flat == 0 then
        call('DEL', alias_key)
        return { t, GONE }
      end
      u, c, s, si, a = nil, nil, nil, nil, nil
      for i = 1, #flat, 2 do
        local f = flat[i]
        if f == 's' then
          s, si = flat[i + 1], i + 1
        elseif f == 'c' then
          c = flat[i + 1]
        elseif f == 'u' then
          u = flat[i + 1]
        elseif f == 'a' then
          a = flat[i + 1]
        end
      end
      if a ~= nil then
        call('DEL', alias_key)
        return { t, GONE }
      end
      via_alias = 1
    end
    if u == nil then
      error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key .. ': no user id'))
    end
    if not (type(c) == 'string' and #c <= 16 and find(c, '^%d+$')) then
      error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key ..
        ': created_at is not a non-negative integer'))
    end
    if not (type(s) == 'string' and #s <= 16 and find(s, '^%d+$')) then
      error(redis.error_reply('ERR statehouse: corrupt session data at ' .. key ..
        ': last_seen is not a non-negative integer'))
    end
    local cn, sn = tonumber(c), tonumber(s)
    local lifetime_end = cn + ABSOLUTE
    local idle_end = sn + IDLE
    if tn >= (idle_end < lifetime_end and idle_end or lifetime_end) then
      -- Dead: delete it (and the alias it was reached through), drop it from the index.
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
      call('HSET', key, 's', t)
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
      flat[si] = t
      touched = 1
    end
    return { t, DONE, id, via_alias, touched, flat }
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
  return string.format('%.0f', n)
end

local function parse_uint(s, what, key)
  if type(s) == 'string' and #s <= 16 and string.match(s, '^%d+$') then
    return tonumber(s)
  end
  raise('corrupt session data at ' .. key .. ': ' .. what .. ' is not a non-negative integer')
end

local function expires_at(c, s)
  return math.min(s + IDLE, c + ABSOLUTE)
end

local function expire_key_at(key, us)
  redis.call('PEXPIREAT', key, fmt(math.ceil(us / 1000) + slack_ms))
end

-- The index lives as long as its longest-lived member (scores only ever grow: a session's
-- expiry never moves backwards).
local function expire_index(idx)
  local top = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
  if top[2] then
    expire_key_at(idx, tonumber(top[2]))
  end
end

local function to_map(flat)
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end

local function hset_pairs(key, list, from)
  local i = from
  while i <= #list do
    local last = math.min(i + 2 * CHUNK - 1, #list)
    redis.call('HSET', key, unpack(list, i, last))
    i = last + 1
  end
end

local function hdel_fields(key, list, from)
  local i = from
  while i <= #list do
    local last = math.min(i + CHUNK - 1, #list)
    redis.call('HDEL', key, unpack(list, i, last))
    i = last + 1
  end
end

local function is_id(s)
  return type(s) == 'string' and #s == 64 and string.match(s, '^[0-9a-f]+$') ~= nil
end

-- Reads the session a presented id stands for, following a rotation alias one hop: a live
-- alias (within its grace) whose target holds a session resolves to that session. Returns nil
-- when nothing resolves, deleting the dead alias met on the way (past its grace, its target
-- gone, or its target itself an alias: aliases resolve one hop only). Else a table: key, id,
-- flat (HGETALL), h (map), c, s, via_alias, alias_key.
local function resolve(key, id)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local h = to_map(flat)
  local via_alias, alias_key = 0, nil
  if h['a'] ~= nil then
    local grace_end = parse_uint(h['g'], 'the alias grace end', key)
    if now >= grace_end then
      redis.call('DEL', key)
      return nil
    end
    if not is_id(h['a']) then
      raise('corrupt session data at ' .. key .. ': the alias target is not a session id')
    end
    alias_key = key
    id = h['a']
    key = base .. id
    flat = redis.call('HGETALL', key)
    if #flat == 0 then
      redis.call('DEL', alias_key)
      return nil
    end
    h = to_map(flat)
    if h['a'] ~= nil then
      redis.call('DEL', alias_key)
      return nil
    end
    via_alias = 1
  end
  if h['u'] == nil then
    raise('corrupt session data at ' .. key .. ': no user id')
  end
  local c = parse_uint(h['c'], 'created_at', key)
  local s = parse_uint(h['s'], 'last_seen', key)
  return {
    key = key, id = id, flat = flat, h = h, c = c, s = s, via_alias = via_alias,
    alias_key = alias_key,
  }
end

-- Deletes a session found dead (and the alias it was reached through) and drops it from the
-- index.
local function bury(idx, sess)
  redis.call('DEL', sess.key)
  if sess.alias_key then
    redis.call('DEL', sess.alias_key)
  end
  redis.call('ZREM', idx, sess.id)
  return { fmt(now), EXPIRED, sess.id, sess.h['u'] }
end

-- Moves last_seen to now: the field, the key's expiry, the index score and the index expiry.
local function refresh(idx, key, id, c)
  redis.call('HSET', key, 's', fmt(now))
  local exp = expires_at(c, now)
  expire_key_at(key, exp)
  redis.call('ZADD', idx, fmt(exp), id)
  expire_index(idx)
end

-- create: KEYS[1] = session key, KEYS[2] = index; ARGV[9] = id, then field/value pairs (u, r,
-- ip, ua, d:*; c and s are set here). Never overwrites: an existing key is a collision.
local function create()
  local key, idx, id = KEYS[1], KEYS[2], ARGV[9]
  if redis.call('EXISTS', key) == 1 then
    return { fmt(now), COLLISION }
  end
  redis.call('HSET', key, 'c', fmt(now), 's', fmt(now))
  hset_pairs(key, ARGV, 10)
  local exp = expires_at(now, now)
  expire_key_at(key, exp)
  -- Members whose score has passed are dead (scores are expiries and never move back).
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', fmt(now))
  redis.call('ZADD', idx, fmt(exp), id)
  expire_index(idx)
  return { fmt(now), DONE }
end

-- update: KEYS[1], KEYS[2] as load; ARGV[9] = presented id, ARGV[10] = '1' to replace the
-- roles by ARGV[11], ARGV[12] = number of fields to set, then that many field/value pairs
-- (names with their d: prefix), then the fields to delete. Writes only to a live session.
local function update()
  local idx = KEYS[2]
  local sess = resolve(KEYS[1], ARGV[9])
  if sess == nil then
    return { fmt(now), GONE }
  end
  if now >= expires_at(sess.c, sess.s) then
    return bury(idx, sess)
  end
  if ARGV[10] == '1' then
    redis.call('HSET', sess.key, 'r', ARGV[11])
  end
  -- Removals first, then sets: a field named in both ends up set.
  local n_set = arg_uint(12, 'the number of fields to set')
  local first_del = 13 + 2 * n_set
  hdel_fields(sess.key, ARGV, first_del)
  local sets = {}
  for i = 13, first_del - 1 do
    sets[#sets + 1] = ARGV[i]
  end
  hset_pairs(sess.key, sets, 1)
  refresh(idx, sess.key, sess.id, sess.c)
  return { fmt(now), DONE }
end

-- rotate: KEYS[1], KEYS[2] as load, KEYS[3] = key of the new id; ARGV[9] = presented id,
-- ARGV[10] = new id. Via a live alias, the alias's target is rotated; the presented alias then
-- points at an alias, so it is dead (one hop). Reply { now, 1, old id, flat fields of the new
-- session... }.
local function rotate()
  local idx, new_key, new_id = KEYS[2], KEYS[3], ARGV[10]
  local sess = resolve(KEYS[1], ARGV[9])
  if sess == nil then
    return { fmt(now), GONE }
  end
  if now >= expires_at(sess.c, sess.s) then
    return bury(idx, sess)
  end
  if redis.call('RENAMENX', sess.key, new_key) == 0 then
    return { fmt(now), COLLISION }
  end
  refresh(idx, new_key, new_id, sess.c)
  redis.call('ZREM', idx, sess.id)
  if GRACE > 0 then
    local grace_end = now + GRACE
    redis.call('HSET', sess.key, 'a', new_id, 'g', fmt(grace_end))
    expire_key_at(sess.key, grace_end)
  end
  local reply = { fmt(now), DONE, sess.id }
  local flat = redis.call('HGETALL', new_key)
  for i = 1, #flat do
    reply[3 + i] = flat[i]
  end
  return reply
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
  if now >= expires_at(sess.c, sess.s) then
    return bury(idx, sess)
  end
  if sess.alias_key then
    redis.call('DEL', sess.alias_key)
  end
  redis.call('DEL', sess.key)
  redis.call('ZREM', idx, sess.id)
  return { fmt(now), DONE, sess.id, sess.h['u'] }
end

-- Walks the index KEYS[1]: prunes members whose key is gone (or is an alias), deletes dead
-- sessions, and calls `live(id, fields)` for each live session of ARGV[9]'s user.
-- Returns the expired ones as a flat list id, user.
local function walk(live)
  local idx, user = KEYS[1], ARGV[9]
  local expired = {}
  local ids = redis.call('ZRANGE', idx, 0, -1)
  for _, id in ipairs(ids) do
    local key = base .. id
    local f = redis.call('HMGET', key, 'u', 'c', 's', 'ip', 'ua')
    if not f[1] then
      redis.call('ZREM', idx, id)
    else
      local c = parse_uint(f[2], 'created_at', key)
      local s = parse_uint(f[3], 'last_seen', key)
      if now >= expires_at(c, s) then
        redis.call('DEL', key)
        redis.call('ZREM', idx, id)
        expired[#expired + 1] = id
        expired[#expired + 1] = f[1]
      elseif f[1] == user then
        live(id, key, c, s, f)
      end
    end
  end
  return expired
end

-- list: KEYS[1] = index; ARGV[9] = user id. Reply { now, { per session: id, created_at,
-- last_seen, has_ip, ip, has_ua, ua ... }, { expired id, user ... } }.
local function list()
  local out = {}
  local expired = walk(function(id, _, c, s, f)
    out[#out + 1] = id
    out[#out + 1] = fmt(c)
    out[#out + 1] = fmt(s)
    out[#out + 1] = f[4] and 1 or 0
    out[#out + 1] = f[4] or ''
    out[#out + 1] = f[5] and 1 or 0
    out[#out + 1] = f[5] or ''
  end)
  return { fmt(now), out, expired }
end

-- revoke_all: KEYS[1] = index; ARGV[9] = user id, ARGV[10] = id to keep or ''.
-- Reply { now, { revoked ids }, { expired id, user ... } }.
local function revoke_all()
  local idx, keep = KEYS[1], ARGV[10]
  local revoked = {}
  local expired = walk(function(id, key)
    if id ~= keep then
      redis.call('DEL', key)
      redis.call('ZREM', idx, id)
      revoked[#revoked + 1] = id
    end
  end)
  return { fmt(now), revoked, expired }
end

-- revoke_id: KEYS[1] = session key, KEYS[2] = index; ARGV[9] = id, ARGV[10] = user id.
-- Only a live session of that user is revoked; an alias is not a session. Reply { now, status,
-- id, user }.
local function revoke_id()
  local key, idx, id, user = KEYS[1], KEYS[2], ARGV[9], ARGV[10]
  local f = redis.call('HMGET', key, 'u', 'c', 's')
  if not f[1] then
    redis.call('ZREM', idx, id)
    return { fmt(now), GONE }
  end
  local c = parse_uint(f[2], 'created_at', key)
  local s = parse_uint(f[3], 'last_seen', key)
  if now >= expires_at(c, s) then
    redis.call('DEL', key)
    redis.call('ZREM', idx, id)
    return { fmt(now), EXPIRED, id, f[1] }
  end
  if f[1] ~= user then
    return { fmt(now), GONE }
  end
  redis.call('DEL', key)
  redis.call('ZREM', idx, id)
  return { fmt(now), DONE, id, f[1] }
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
