-- Statehouse rate limiter: `statehouse_core::algorithm::decide` for a batch of checks, in one
-- atomic step on the Redis server.
--
-- Every step below mirrors the Rust function of the same name in
-- crates/statehouse-core/src/algorithm.rs, with the same integer arithmetic, so a differential
-- test can compare the two decision by decision. Lua numbers are doubles: every value handled
-- here is an integer below 2^53 (times are microseconds, periods at most ten years, limits at
-- most 10^9), where doubles are exact and `math.floor(a / b)` is exact integer division.
--
-- KEYS: one storage key per check.
-- ARGV[1]  mode: 'consume' | 'peek' | 'dry_run' | 'refund'
--            consume  decide every check; write every new state only if every check is admitted
--            peek     decide as a peek (Mode::Peek); never write
--            dry_run  decide as a consume would; never write (used on Redis Cluster to report the
--                     checks of a batch that were not consumed because another slot denied)
--            refund   undo a consumption made at ARGV[2] (Redis Cluster, cross-slot batches)
-- ARGV[2]  now in microseconds since the epoch, or '' to read the server's TIME
-- ARGV[3]  slack in milliseconds added to every expiry
-- then 7 per check: algorithm code, limit, period_us, burst, interval_us, max_delay_us, cost
--
-- Returns { now, then per check: allowed (1/0), remaining, reset_after_us, retry_after_us (-1 for
-- none), delay_us }. Refund returns { now }.
--
-- State encodings (one key per check):
--   fixed window (1)      HASH  w = window index (now / period), c = count
--   sliding log (2)       ZSET  score = admission time (us), member = '<time>-<n>' (unique)
--   sliding counter (3)   HASH  w = window index, c = current count, p = previous count
--   token bucket (4)      HASH  t = tokens, l = time (us) up to which refills were credited
--   leaky bucket (5)      STRING  theoretical arrival time (us)
--   gcra (6)              STRING  theoretical arrival time (us)
-- Every write sets an expiry; no key is ever left without a TTL.

-- Redis 3.2-4 replicate scripts verbatim unless told otherwise; TIME before writes needs effects
-- replication. Redis 5+ does this by default and 7 ignores the call.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local FIXED_WINDOW, SLIDING_LOG, SLIDING_COUNTER, TOKEN_BUCKET, LEAKY_BUCKET, GCRA = 1, 2, 3, 4, 5, 6
-- 2^53: above it doubles stop being exact integers.
local MAX_EXACT = 9007199254740992
local ARGS_PER_CHECK = 7
-- Members per ZADD/ZREM call: far below the Lua stack limit that `unpack` runs into.
local CHUNK = 512

local function raise(msg)
  error(redis.error_reply('ERR statehouse: ' .. msg))
end

-- An integer as Redis should store it. Never let Lua turn a number into a string by itself: it
-- uses '%.14g' and would write 1.7e+15.
local function fmt(n)
  return string.format('%.0f', n)
end

-- Parses a non-negative integer stored at `key` (or passed as an argument), refusing anything
-- else: a value that does not parse is reported, never read as zero.
local function parse_uint(s, what, key)
  if type(s) == 'string' and #s <= 16 and string.match(s, '^%d+$') then
    local n = tonumber(s)
    if n ~= nil and n <= MAX_EXACT then
      return n
    end
  end
  if key then
    raise('corrupt state at key ' .. key .. ': field ' .. what .. ' is ' .. tostring(s)
      .. ', not a non-negative integer (was the key written by another program?)')
  end
  raise('invalid argument ' .. what .. ': ' .. tostring(s))
end

local function key_type(key)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then
    return t.ok
  end
  return t
end

-- The key's type must be `expected` (or the key absent): returns true when present.
local function check_type(key, expected)
  local t = key_type(key)
  if t == 'none' then
    return false
  end
  if t ~= expected then
    error(redis.error_reply('WRONGTYPE statehouse: key ' .. key .. ' holds a ' .. tostring(t)
      .. ', expected a ' .. expected .. ' (was it written by another program?)'))
  end
  return true
end

-- Reads the named hash fields as integers; nil when the key is absent.
local function read_hash(key, fields)
  if not check_type(key, 'hash') then
    return nil
  end
  local raw = redis.call('HMGET', key, unpack(fields))
  local out = {}
  for i, field in ipairs(fields) do
    local v = raw[i]
    if v == false or v == nil then
      v = '(missing)'
    end
    out[field] = parse_uint(v, field, key)
  end
  return out
end

local function read_tat(key)
  if not check_type(key, 'string') then
    return nil
  end
  return parse_uint(redis.call('GET', key), 'tat', key)
end

local function ttl_ms(expires_at, now, slack_ms)
  local d = expires_at - now
  local ms = 0
  if d > 0 then
    ms = math.floor((d + 999) / 1000)
  end
  ms = ms + slack_ms
  if ms < 1 then
    ms = 1
  end
  return ms
end

-- Saturating subtraction of u64s.
local function sat_sub(a, b)
  if a > b then
    return a - b
  end
  return 0
end

local function allow(remaining, reset_after, delay)
  return { allowed = true, remaining = remaining, reset_after = reset_after, retry_after = -1,
    delay = delay }
end

local function deny(remaining, reset_after, retry_after)
  return { allowed = false, remaining = remaining, reset_after = reset_after,
    retry_after = retry_after, delay = 0 }
end

-- Each algorithm returns the decision and, for an admitted consume, a `write` function plus
-- `expires_at` (absolute us).

local function fixed_window(key, c, now, consume)
  local period, limit, cost = c.period, c.limit, c.cost
  local window = math.floor(now / period)
  local count = 0
  local st = read_hash(key, { 'w', 'c' })
  if st then
    -- A window from the future (the clock stepped back) still counts: never more permissive.
    if st.w >= window then
      window = st.w
      count = st.c
    end
  end
  local window_end = (window + 1) * period
  local reset_after = sat_sub(window_end, now)
  if count + cost <= limit then
    local new_count = count + cost
    local d = allow(limit - new_count, reset_after, 0)
    if consume then
      d.expires_at = window_end
      d.write = function()
        redis.call('HSET', key, 'w', fmt(window), 'c', fmt(new_count))
      end
    end
    return d
  end
  return deny(sat_sub(limit, count), reset_after, reset_after)
end

local function sliding_log(key, c, now, consume)
  local period, limit, cost = c.period, c.limit, c.cost
  local used, newest, oldest_needed = 0, nil, nil
  -- An entry counts while `ts + period > now`, i.e. `ts > now - period`.
  local live_from = '(' .. fmt(now - period)
  if check_type(key, 'zset') then
    used = redis.call('ZCOUNT', key, live_from, '+inf')
    if used > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      newest = parse_uint(last[2], 'score', key)
    end
  end
  if used + cost <= limit then
    local remaining = limit - used - cost
    -- Both branches of the Rust code end at max(newest, now).
    local newest_after = now
    if newest and newest > now then
      newest_after = newest
    end
    local d = allow(remaining, newest_after + period - now, 0)
    if consume then
      d.expires_at = newest_after + period
      d.write = function()
        redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - period))
        local score = fmt(now)
        local added, j = 0, 0
        -- The same microsecond can come again (caller-supplied time), so members are probed
        -- with NX until `cost` new ones are in; in chunks, since a cost can be 100000.
        while added < cost do
          local args = { 'ZADD', key, 'NX' }
          for _ = 1, math.min(cost - added, CHUNK) do
            args[#args + 1] = score
            args[#args + 1] = score .. '-' .. j
            j = j + 1
          end
          added = added + redis.call(unpack(args))
        end
      end
    end
    return d
  end
  -- Wait until enough of the oldest entries have left the window.
  local must_leave = used + cost - limit
  local row = redis.call('ZRANGEBYSCORE', key, live_from, '+inf', 'WITHSCORES', 'LIMIT',
    fmt(must_leave - 1), 1)
  oldest_needed = parse_uint(row[2], 'score', key)
  local newest_or_now = newest or now
  local retry_after = sat_sub(oldest_needed + period, now)
  local reset_after = sat_sub(newest_or_now + period, now)
  return deny(sat_sub(limit, used), reset_after, retry_after)
end

-- floor(previous * (period - elapsed) / period) in doubles, operation for operation as Rust's
-- `weighted_previous`.
local function weighted_previous(previous, period, elapsed)
  return math.floor(previous * (period - elapsed) / period)
end

-- The least e in lo..=period with weighted_previous(previous, period, e) <= room; Rust's
-- `least_elapsed_within`, step by step.
local function least_elapsed_within(previous, period, room, lo)
  local hi = period
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if weighted_previous(previous, period, mid) <= room then
      hi = mid
    else
      lo = mid + 1
    end
  end
  return lo
end

local function sliding_counter(key, c, now, consume)
  local period, limit, cost = c.period, c.limit, c.cost
  local window = math.floor(now / period)
  local current, previous = 0, 0
  local st = read_hash(key, { 'w', 'c', 'p' })
  if st then
    if st.w >= window then
      -- Same window, or one from the future (clock stepped back): counts in full.
      window = st.w
      current = st.c
      previous = st.p
    elseif st.w + 1 == window then
      previous = st.c
    end
  end
  local window_start = window * period
  local elapsed = sat_sub(now, window_start)
  if elapsed > period - 1 then
    elapsed = period - 1
  end
  local estimate = weighted_previous(previous, period, elapsed) + current
  if estimate + cost <= limit then
    local remaining = limit - estimate - cost
    local current_after = current
    if consume then
      current_after = current + cost
    end
    local reset_at = window_start + period
    if current_after > 0 then
      reset_at = window_start + 2 * period
    end
    local d = allow(remaining, sat_sub(reset_at, now), 0)
    if consume then
      d.expires_at = window_start + 2 * period
      d.write = function()
        redis.call('HSET', key, 'w', fmt(window), 'c', fmt(current_after), 'p', fmt(previous))
      end
    end
    return d
  end
  local retry_at
  if current + cost <= limit then
    -- Within this window, once the previous window's weight has decayed enough.
    local room = limit - cost - current
    retry_at = window_start + least_elapsed_within(previous, period, room, elapsed + 1)
  else
    -- In the next window, where this window's count becomes the weighted previous one.
    local room = limit - cost
    retry_at = window_start + period + least_elapsed_within(current, period, room, 0)
  end
  local reset_at = window_start + period
  if current > 0 then
    reset_at = window_start + 2 * period
  end
  return deny(sat_sub(limit, estimate), sat_sub(reset_at, now), sat_sub(retry_at, now))
end

local function token_bucket(key, c, now, consume)
  local capacity, interval, cost = c.burst, c.interval, c.cost
  local tokens, last = capacity, now
  local st = read_hash(key, { 't', 'l' })
  if st then
    tokens, last = st.t, st.l
  end
  if now > last then
    local credited = math.floor((now - last) / interval)
    if credited > 0 then
      tokens = tokens + credited
      if tokens > capacity then
        tokens = capacity
      end
      if tokens == capacity then
        last = now
      else
        last = last + credited * interval
      end
    end
  end
  -- Time from `now` until the bucket holds `want` tokens, given `have` credited up to `last`.
  local function time_to(have, want)
    if have >= want then
      return 0
    end
    return sat_sub(last + (want - have) * interval, now)
  end
  if tokens >= cost then
    local left = tokens - cost
    local reset_after = time_to(left, capacity)
    local d = allow(left, reset_after, 0)
    if consume then
      d.expires_at = now + reset_after
      d.write = function()
        redis.call('HSET', key, 't', fmt(left), 'l', fmt(last))
      end
    end
    return d
  end
  return deny(tokens, time_to(tokens, capacity), time_to(tokens, cost))
end

local function gcra(key, c, now, consume, slack_ms)
  local interval, burst, cost = c.interval, c.burst, c.cost
  local tolerance = burst * interval
  local tat = read_tat(key)
  if tat == nil or tat < now then
    tat = now
  end
  local new_tat = tat + cost * interval
  if new_tat - now <= tolerance then
    local remaining = math.floor((tolerance - (new_tat - now)) / interval)
    local d = allow(remaining, new_tat - now, 0)
    if consume then
      d.expires_at = new_tat
      d.write = function()
        redis.call('SET', key, fmt(new_tat), 'PX', fmt(ttl_ms(new_tat, now, slack_ms)))
      end
      d.sets_ttl = true
    end
    return d
  end
  local remaining = math.floor(sat_sub(tolerance, tat - now) / interval)
  return deny(remaining, tat - now, new_tat - now - tolerance)
end

local function leaky_bucket(key, c, now, consume, slack_ms)
  local interval, max_delay, cost = c.interval, c.max_delay, c.cost
  local start = read_tat(key)
  if start == nil or start < now then
    start = now
  end
  local delay = start - now
  if delay <= max_delay then
    local new_tat = start + cost * interval
    local queued = new_tat - now
    -- How many more single-unit requests could still be queued behind this one.
    local remaining = 0
    if queued <= max_delay then
      remaining = math.floor((max_delay - queued) / interval) + 1
    end
    local d = allow(remaining, queued, delay)
    if consume then
      d.expires_at = new_tat
      d.write = function()
        redis.call('SET', key, fmt(new_tat), 'PX', fmt(ttl_ms(new_tat, now, slack_ms)))
      end
      d.sets_ttl = true
    end
    return d
  end
  return deny(0, delay, delay - max_delay)
end

-- Undoes a consumption of `c.cost` made at `now`, keeping the key's TTL; does nothing when the
-- key is gone or its state has moved on.
local function refund(key, c, now)
  local alg = c.code
  if alg == FIXED_WINDOW then
    local st = read_hash(key, { 'w', 'c' })
    if st and st.w == math.floor(now / c.period) then
      redis.call('HSET', key, 'c', fmt(sat_sub(st.c, c.cost)))
    end
  elseif alg == SLIDING_COUNTER then
    local st = read_hash(key, { 'w', 'c', 'p' })
    if st then
      local window = math.floor(now / c.period)
      if st.w == window then
        redis.call('HSET', key, 'c', fmt(sat_sub(st.c, c.cost)))
      elseif st.w == window + 1 then
        redis.call('HSET', key, 'p', fmt(sat_sub(st.p, c.cost)))
      end
    end
  elseif alg == SLIDING_LOG then
    if check_type(key, 'zset') then
      local score = fmt(now)
      local members = redis.call('ZRANGEBYSCORE', key, score, score, 'LIMIT', 0, fmt(c.cost))
      -- In chunks: `unpack` of 100000 values would overflow Lua's stack.
      for first = 1, #members, CHUNK do
        redis.call('ZREM', key, unpack(members, first, math.min(first + CHUNK - 1, #members)))
      end
    end
  elseif alg == TOKEN_BUCKET then
    local st = read_hash(key, { 't', 'l' })
    if st then
      local tokens = st.t + c.cost
      if tokens >= c.burst then
        -- A full bucket is no state at all. Keeping `l` would not be: a full bucket whose
        -- refills were credited up to some past time would refill its next token early.
        redis.call('DEL', key)
      else
        redis.call('HSET', key, 't', fmt(tokens))
      end
    end
  elseif alg == LEAKY_BUCKET or alg == GCRA then
    local tat = read_tat(key)
    if tat then
      redis.call('SET', key, fmt(sat_sub(tat, c.cost * c.interval)), 'KEEPTTL')
    end
  end
end

local ALGORITHMS = {
  [FIXED_WINDOW] = fixed_window,
  [SLIDING_LOG] = sliding_log,
  [SLIDING_COUNTER] = sliding_counter,
  [TOKEN_BUCKET] = token_bucket,
  [LEAKY_BUCKET] = leaky_bucket,
  [GCRA] = gcra,
}

-- Arguments.
local mode = ARGV[1]
if mode ~= 'consume' and mode ~= 'peek' and mode ~= 'dry_run' and mode ~= 'refund' then
  raise('invalid mode ' .. tostring(mode))
end
local n = #KEYS
if #ARGV ~= 3 + n * ARGS_PER_CHECK then
  raise('expected ' .. (3 + n * ARGS_PER_CHECK) .. ' arguments for ' .. n .. ' keys, got ' .. #ARGV)
end
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = parse_uint(ARGV[2], 'now')
end
local slack_ms = parse_uint(ARGV[3], 'slack_ms')

local checks = {}
for i = 1, n do
  local base = 3 + (i - 1) * ARGS_PER_CHECK
  local c = {
    code = parse_uint(ARGV[base + 1], 'algorithm'),
    limit = parse_uint(ARGV[base + 2], 'limit'),
    period = parse_uint(ARGV[base + 3], 'period'),
    burst = parse_uint(ARGV[base + 4], 'burst'),
    interval = parse_uint(ARGV[base + 5], 'interval'),
    max_delay = parse_uint(ARGV[base + 6], 'max_delay'),
    cost = parse_uint(ARGV[base + 7], 'cost'),
  }
  if ALGORITHMS[c.code] == nil then
    raise('unknown algorithm code ' .. c.code)
  end
  if c.limit < 1 or c.period < 1 or c.burst < 1 or c.interval < 1 or c.cost < 1 then
    raise('limit, period, burst, interval and cost must be at least 1 (check ' .. i .. ')')
  end
  -- Policy::capacity: the burst for the token bucket and GCRA, the limit otherwise.
  local capacity = c.limit
  if c.code == TOKEN_BUCKET or c.code == GCRA then
    capacity = c.burst
  end
  if c.cost > capacity then
    raise('cost ' .. fmt(c.cost) .. ' exceeds the capacity ' .. fmt(capacity) .. ' (check ' .. i .. ')')
  end
  checks[i] = c
end

if mode == 'refund' then
  for i = 1, n do
    refund(KEYS[i], checks[i], now)
  end
  return { now }
end

-- Decide every check first; write only if every one is admitted (all or nothing).
local consume = mode ~= 'peek'
local decisions = {}
local all_allowed = true
for i = 1, n do
  local c = checks[i]
  local d = ALGORITHMS[c.code](KEYS[i], c, now, consume, slack_ms)
  decisions[i] = d
  if not d.allowed then
    all_allowed = false
  end
end

if mode == 'consume' and all_allowed then
  for i = 1, n do
    local d = decisions[i]
    d.write()
    if not d.sets_ttl then
      redis.call('PEXPIRE', KEYS[i], fmt(ttl_ms(d.expires_at, now, slack_ms)))
    end
  end
end

local reply = { now }
for i = 1, n do
  local d = decisions[i]
  local allowed = 0
  if d.allowed then
    allowed = 1
  end
  reply[#reply + 1] = allowed
  reply[#reply + 1] = d.remaining
  reply[#reply + 1] = d.reset_after
  reply[#reply + 1] = d.retry_after
  reply[#reply + 1] = d.delay
end
return reply
