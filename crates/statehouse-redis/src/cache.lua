-- Statehouse cache store: every write, lease and tag operation of the Redis cache store in one
-- atomic step (see src/cache.rs for the key layout and src/cache_script.rs for the callers).
--
-- ARGV[1] is the operation. Keys are named by the caller:
--   data   <prefix>c:{<key>}        the value (a string, PX from the caller's TTL)
--   lease  <prefix>c:{<key>}:lease  "<token>:<expires_at µs>" (PX from the lease TTL)
--   tag    <prefix>t:{<tag>}        the tag's version, a decimal integer (PX 30 days, refreshed)
-- A data key and its lease share their hash tag, so every call touches one Cluster slot.
--
--   set      KEYS = { data, lease }  ARGV = { op, channel, message, value, ttl ms, token }
--            token "" is a plain write: store, void any lease, publish; returns 1.
--            Otherwise a fill: only while the lease holds exactly that token; it stores,
--            consumes the lease and publishes (1), or changes nothing (0).
--   delete   KEYS = { data, lease }  ARGV = { op, channel, message }
--            deletes both, publishes; returns the number of values deleted (0 or 1).
--   acquire  KEYS = { lease }        ARGV = { op, token, now µs, ttl µs, ttl ms }
--            grants (1) when no lease is stored or the stored one expired by `now` (the
--            caller's clock) or cannot be read; otherwise 0. Publishes nothing: no value changed.
--   release  KEYS = { lease }        ARGV = { op, token }
--            deletes the lease if it holds `token` (1), else 0. Publishes nothing.
--   bump     KEYS = { tag }          ARGV = { op, channel, message, fresh version, ttl ms }
--            INCR of a stored version, or the fresh (random) version for a tag not stored;
--            refreshes the TTL and publishes; returns the new version.
--   tags     KEYS = tag keys         ARGV = { op, ttl ms, refresh below ms, fresh 1, fresh 2, ... }
--            each tag's stored version, or its fresh version stored with SET NX semantics
--            (nothing was there: this script is atomic). A TTL below `refresh below` is
--            renewed, so a tag in use never expires while writes stay rare. Returns the
--            versions as strings (Lua numbers are doubles; strings keep every digit).

local op = ARGV[1]

if op == 'set' then
  local token = ARGV[6]
  if token ~= '' then
    local held = redis.call('GET', KEYS[2])
    if not held or string.match(held, '^(%x+):') ~= token then
      return 0
    end
  end
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
elseif op == 'delete' then
  local existed = redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return existed
elseif op == 'acquire' then
  local held = redis.call('GET', KEYS[1])
  if held then
    local expires = tonumber(string.match(held, '^%x+:(%d+)$'))
    -- A lease that cannot be read is as good as expired: its holder cannot prove anything.
    if expires and expires > tonumber(ARGV[3]) then
      return 0
    end
  end
  local expires_at = tonumber(ARGV[3]) + tonumber(ARGV[4])
  redis.call('SET', KEYS[1], ARGV[2] .. ':' .. string.format('%.0f', expires_at), 'PX', ARGV[5])
  return 1
elseif op == 'release' then
  local held = redis.call('GET', KEYS[1])
  if held and string.match(held, '^(%x+):') == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
elseif op == 'bump' then
  local version
  if redis.call('EXISTS', KEYS[1]) == 1 then
    version = redis.call('INCR', KEYS[1])
  else
    version = tonumber(ARGV[4])
    redis.call('SET', KEYS[1], ARGV[4])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return version
elseif op == 'tags' then
  local ttl = ARGV[2]
  local refresh_below = tonumber(ARGV[3])
  local versions = {}
  for i, key in ipairs(KEYS) do
    local version = redis.call('GET', key)
    if version then
      -- -1 (no TTL, written by someone else) is renewed too: every key has a TTL.
      if redis.call('PTTL', key) < refresh_below then
        redis.call('PEXPIRE', key, ttl)
      end
    else
      version = ARGV[3 + i]
      redis.call('SET', key, version, 'PX', ttl)
    end
    versions[i] = version
  end
  return versions
end

return redis.error_reply('statehouse: unknown cache operation ' .. tostring(op))
