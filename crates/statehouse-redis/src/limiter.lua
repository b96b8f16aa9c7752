-- Statehouse rate limiter: `statehouse_core::algorithm::decide` for a batch of checks, in one
-- atomic step on the Redis server.
--
-- Every step below mirrors the Rust function of the same name in
-- crates/statehouse-core/src/algorithm.rs, with the same integer arithmetic, so a differential
-- test can compare the two decision by decision. Lua numbers are doubles: every value handled
-- here is an integer below 2^53 (times are microseconds, periods at most ten years, limits at
-- most 10^9), where doubles are exact and `math.floor(a / b)` is exact integer division.
--
-- The script is one straight chunk on purpose: Redis runs the whole chunk on every call, so it
-- defines no function (outside the rare refund mode) and builds no table per check in the common
-- modes. Its arguments come from the Rust side, which has already validated every policy, so
-- they are not re-validated here; the state read from Redis is, always.
--
-- Independent mode has a fast path for its common check, a gcra check that consumes on the
-- server's TIME (the coalesced single checks of a busy service): a straight loop at the top of
-- the main loop, which decides and writes exactly as the general code below it but works out once
-- per (policy, cost) of the call what a check finding no key or a passed arrival time decides
-- and writes, so that such a check costs the server about a quarter less (see the comment above
-- the loop). Every other check goes through the general code, as before.
--
-- KEYS: one storage key per check.
-- ARGV[1]  mode: 'consume' | 'peek' | 'dry_run' | 'refund' | 'independent'
--            consume      decide every check; write every new state only if every check admits
--            peek         decide as a peek (Mode::Peek); never write
--            dry_run      decide as a consume would; never write (used on Redis Cluster to report
--                         the checks of a batch that were not consumed because another slot denied)
--            refund       undo a consumption made at ARGV[2] (Redis Cluster, cross-slot batches)
--            independent  the coalesced single checks of several callers: each check is decided
--                         and (if admitted and consuming) written on its own, in order, exactly as
--                         if it had been a call of its own; a check whose state is corrupt or of
--                         the wrong type gets an error of its own and the others go on
-- ARGV[2]  now in microseconds since the epoch, or '' to read the server's TIME; in independent
--          mode, '' (every check on the server's TIME), 'same' (as '', the checks sharing one
--          policy number and cost, sent once) or 'caller' (each check carries its time)
-- ARGV[3]  slack in milliseconds added to every expiry
-- then per check (every mode but independent): algorithm code, a, b, cost, where (a, b) is
--     fixed window, sliding log, sliding counter   (limit, period_us)
--     token bucket, gcra                           (burst, interval_us)
--     leaky bucket                                 (max_delay_us, interval_us)
-- or, in independent mode, where the checks of a batch mostly share a few policies:
--   ARGV[4] the number P of distinct policies, then P times: algorithm code, a, b (as above)
--   then per check: its policy's number (1..P; negated for a peek), cost, and with 'caller' its
--   time (or '' for the server's TIME); or, with ARGV[2] 'same' (server's TIME, every check of
--   the same policy, mode and cost: one limiter's coalesced checks, the common batch), that
--   number and cost once for all the checks. Every argument costs the server a parse, an object
--   and a Lua string; 'same' sends one per check (its key) instead of three.
--
-- Returns { now, then per check: allowed (1/0), remaining, reset_after_us, retry_after_us (-1 for
-- none), delay_us }. Refund returns { now }. In independent mode `now` is the server's TIME if it
-- was read (0 otherwise), and each check's values are packed, since nearly every check admits
-- at once: an admitted check without delay (retry_after -1, delay 0) is just
-- { remaining, reset_after_us }; any other decision is -1 followed by the five values above; a
-- check that failed is its error message (a string) alone. The first value tells them apart
-- (remaining is never negative). Every value costs the server a conversion and the client a
-- parse: this cuts the reply of a typical batch from 5 to 2 values per check.
--
-- State encodings (one key per check):
--   fixed window (1)      HASH  w = window index (now / period), c = count
--   sliding log (2)       ZSET  score = admission time (us), member = '<time>-<n>' (unique)
--   sliding counter (3)   HASH  w = window index, c = current count, p = previous count
--   token bucket (4)      HASH  t = tokens, l = time (us) up to which refills were credited
--   leaky bucket (5)      STRING  theoretical arrival time (us)
--   gcra (6)              STRING  theoretical arrival time (us)
-- Every write sets an expiry; no key is ever left without a TTL. A key of the wrong type makes
-- the read itself (GET, HMGET, ZCOUNT) fail with WRONGTYPE; a value that is not a non-negative
-- integer below 2^53 is reported as corrupt, never read as zero.
--
-- Integers are formatted with '%d' (exact below 2^53). Never let Lua turn a number into a string
-- by itself: it uses '%.14g' and would write 1.7e+15.

-- Redis 3.2-4 replicate scripts verbatim unless told otherwise; TIME before writes needs effects
-- replication. Redis 5+ does this by default and 7 ignores the call.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local MAX_EXACT = 9007199254740992
-- Members per ZADD/ZREM call: far below the Lua stack limit that `unpack` runs into.
local CHUNK = 512
local format, match, find, floor, tonumber = string.format, string.match, string.find, math.floor,
  tonumber
local call, pcall_redis = redis.call, redis.pcall
local CORRUPT = ', not a non-negative integer (was the key written by another program?)'

local mode = ARGV[1]
local n = #KEYS
local independent = mode == 'independent'
-- Where the per-check arguments start, and how many there are per check.
local base, per = 3, 4
-- Independent mode: the batch's policies, three values each, and whether checks carry times.
-- The arguments of check i start after ARGV[base + (i - 1) * per]: with 'same', `per` is 0 and
-- every check reads the one shared pair.
local policies, policy_count, caller_times, shared = nil, 0, false, 0
if independent then
  caller_times = ARGV[2] == 'caller'
  policy_count = tonumber(ARGV[4]) or 0
  policies = {}
  for k = 1, 3 * policy_count do
    policies[k] = tonumber(ARGV[4 + k])
  end
  base = 4 + 3 * policy_count
  if ARGV[2] == 'same' then
    per, shared = 0, 2
  else
    per = caller_times and 3 or 2
  end
elseif mode ~= 'consume' and mode ~= 'peek' and mode ~= 'dry_run' and mode ~= 'refund' then
  error(redis.error_reply('ERR statehouse: invalid mode ' .. tostring(mode)))
end
local slack_ms = tonumber(ARGV[3])
if #ARGV ~= base + n * per + shared or slack_ms == nil then
  error(redis.error_reply('ERR statehouse: expected ' .. (base + n * per + shared)
    .. ' arguments for ' .. n .. ' keys, got ' .. #ARGV))
end

-- The batch's time (every mode but independent); the server's TIME, read at most once.
local batch_now, server_now = nil, nil
if not independent then
  if ARGV[2] == '' then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    batch_now = server_now
  else
    batch_now = tonumber(ARGV[2])
    if batch_now == nil then
      error(redis.error_reply('ERR statehouse: invalid argument now: ' .. ARGV[2]))
    end
  end
end

if mode == 'refund' then
  -- Undoes a consumption of `cost` made at `now`, keeping each key's TTL; does nothing when the
  -- key is gone or its state has moved on. Rare (cross-slot batches on a cluster), so plain
  -- helpers are fine here.
  local now = batch_now
  local function uint(s, what, key)
    local x = type(s) == 'string' and #s <= 16 and match(s, '^%d+$') and tonumber(s)
    if not x or x > MAX_EXACT then
      error(redis.error_reply('ERR statehouse: corrupt state at key ' .. key .. ': field ' .. what
        .. ' is ' .. tostring(s or '(missing)') .. CORRUPT))
    end
    return x
  end
  local function hash(key, ...)
    local raw = redis.call('HMGET', key, ...)
    local fields = { ... }
    local present = false
    for f = 1, #raw do
      if raw[f] then
        present = true
      end
    end
    if not present and redis.call('EXISTS', key) == 0 then
      return nil
    end
    for f = 1, #raw do
      raw[f] = uint(raw[f], fields[f], key)
    end
    return raw
  end
  for i = 1, n do
    local key, b = KEYS[i], 3 + (i - 1) * 4
    local code, a, p, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
      tonumber(ARGV[b + 4])
    if code == 1 then
      local st = hash(key, 'w', 'c')
      if st and st[1] == floor(now / p) then
        redis.call('HSET', key, 'c', format('%d', st[2] > cost and st[2] - cost or 0))
      end
    elseif code == 3 then
      local st = hash(key, 'w', 'c', 'p')
      if st then
        local window = floor(now / p)
        if st[1] == window then
          redis.call('HSET', key, 'c', format('%d', st[2] > cost and st[2] - cost or 0))
        elseif st[1] == window + 1 then
          redis.call('HSET', key, 'p', format('%d', st[3] > cost and st[3] - cost or 0))
        end
      end
    elseif code == 2 then
      local score = format('%d', now)
      local members = redis.call('ZRANGEBYSCORE', key, score, score, 'LIMIT', 0, format('%d', cost))
      -- In chunks: `unpack` of 100000 values would overflow Lua's stack.
      for first = 1, #members, CHUNK do
        redis.call('ZREM', key, unpack(members, first, math.min(first + CHUNK - 1, #members)))
      end
    elseif code == 4 then
      local st = hash(key, 't', 'l')
      if st then
        local tokens = st[1] + cost
        if tokens >= a then
          -- A full bucket is no state at all. Keeping `l` would not be: a full bucket whose
          -- refills were credited up to some past time would refill its next token early.
          redis.call('DEL', key)
        else
          redis.call('HSET', key, 't', format('%d', tokens))
        end
      end
    elseif code == 5 or code == 6 then
      local raw = redis.call('GET', key)
      if raw then
        local tat = uint(raw, 'tat', key)
        local back = cost * p
        redis.call('SET', key, format('%d', tat > back and tat - back or 0), 'KEEPTTL')
      end
    else
      error(redis.error_reply('ERR statehouse: unknown algorithm code ' .. tostring(ARGV[b + 1])))
    end
  end
  return { batch_now }
end

-- consume / dry_run decide as a consume would; only consume and independent write.
local consume_all = mode ~= 'peek'
local write_all = mode == 'consume'
-- A consume of several checks decides them all first and writes only if all admit: the writes
-- wait in `pending` (six slots per check). Every other call writes a check right after
-- deciding it.
local deferred = write_all and n > 1
local pending = nil
local loops = n
if deferred then
  pending = {}
  loops = 2 * n
end
local all_allowed = true
-- Cleared when SET ... GET turns out unsupported (Redis before 6.2).
local set_get = true
-- Memos for the independent mode, whose checks mostly repeat the same few values: `tonumber`
-- of an argument string (a policy number, a cost) and `format('%d', x)` of a number (the new
-- arrival time and the expiry of a fresh key, shared by the checks of one policy and cost on
-- the server's TIME). In Redis's Lua each costs far more than a table lookup (`tonumber` about
-- 0.5 us, `format` about 0.7 us, a lookup about 0.03 us), and they were a quarter of a check.
local number_of, string_of = {}, {}
local reply = { 0 }
local r = 1

-- The fast path: in independent mode on the server's TIME, a check of a gcra policy that
-- consumes is decided by the straight loop at the top of the main loop below, which runs from
-- check i for as long as the checks are such checks, and hands a check of any other kind to the
-- general code (then takes over again). It decides and writes exactly as the general code does
-- (see there for why: the optimistic SET ... GET, then a second write only when the stored
-- arrival time is still to come), but per (policy, cost) of the call it works out once what a
-- check that finds no key, or a key whose arrival time has passed, decides and writes: nearly
-- every check, since a key's expiry follows its arrival time closely. Such a check is then two
-- string comparisons, the SET ... GET and two reply values. In Redis's Lua every VM instruction
-- (some 50 machine instructions) and every C function call (`type` some 700, `math.floor` 350,
-- `match` 1 700, `tonumber` 2 000) counts: the general code spends about a hundred VM
-- instructions and four such calls on that check, this loop about thirty and none. In
-- callgrind's count of the server's instructions, a batch of 24 such checks went from about
-- 28 600 to 21 800 per check, everything (parsing, the SET, expiry) included.
-- Any surprise (an error other than WRONGTYPE from SET ... GET, such as a server before 6.2 or
-- one refusing writes) hands the check, with nothing written, to the general code, which retries
-- it and handles it as it always did; corrupt state and WRONGTYPE are handled here exactly as
-- there (a test runs one batch both ways and compares the replies and the states left).
local fast, fast_policy = false, nil
if independent and not caller_times and n > 0 then
  -- Read now rather than at the first check: every check of the call is on this time.
  local tt = call('TIME')
  server_now = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
  -- A gcra policy's number, as the Rust side writes it, to { burst, interval } and, for each
  -- cost string seen, what the check decides on a state that does not matter (false when the
  -- fast path does not take it).
  fast_policy = {}
  for k = 1, policy_count do
    local a, p = policies[3 * k - 1], policies[3 * k]
    if policies[3 * k - 2] == 6 and a and p then
      fast_policy[format('%d', k)] = { a, p }
      fast = true
    end
  end
end
local argv, keys = ARGV, KEYS
-- The fast path's last (policy, cost) strings, their entry, and the entry's first four values.
local fast_s, fast_c, fe, fe_tat, fe_ttl, fe_remaining, fe_reset = nil, nil, nil, nil, nil, nil, nil

local i = 1
while i <= loops do
  if fast then
    local now = server_now
    while i <= n do
      local b = base + (i - 1) * per
      local s, c = argv[b + 1], argv[b + 2]
      if s ~= fast_s or c ~= fast_c then
        local memo = fast_policy[s]
        if memo == nil then
          break
        end
        local e = memo[c]
        if e == nil then
          -- This (policy, cost): as the general code decides on tat = now (no key, or one whose
          -- arrival time has passed), which always admits with the optimistic write when
          -- cost <= burst. Anything else is the general code's.
          e = false
          local cost, a, p = tonumber(c), memo[1], memo[2]
          if cost ~= nil and cost <= a then
            local new_tat = now + cost * p
            local ttl = floor((new_tat - now + 999) / 1000) + slack_ms
            if ttl < 1 then
              ttl = 1
            end
            local tolerance = a * p
            if new_tat - now <= tolerance then
              e = { format('%d', new_tat), format('%d', ttl),
                floor((tolerance - (new_tat - now)) / p), new_tat - now, cost, a, p, tolerance }
            end
          end
          memo[c] = e
        end
        if not e then
          break
        end
        fast_s, fast_c, fe = s, c, e
        fe_tat, fe_ttl, fe_remaining, fe_reset = e[1], e[2], e[3], e[4]
      end
      local key = keys[i]
      local raw = pcall_redis('SET', key, fe_tat, 'PX', fe_ttl, 'GET')
      if not raw then
        -- No key (or an expired one): tat = now, written above.
        reply[r + 1], reply[r + 2] = fe_remaining, fe_reset
        r = r + 2
      else
        -- `raw.err` of a string is string.err: nil.
        local err = raw.err
        if err then
          if not match(err, 'WRONGTYPE') then
            -- Nothing was written: the general code retries this check and goes on from it.
            fast = false
            break
          end
          reply[r + 1] = err
          r = r + 1
        else
          -- As the general code's check, with `find` and `+ 0` (both cheaper than `match` and
          -- `tonumber`, which converts twice): the same strings pass, to the same number.
          local x = #raw <= 16 and find(raw, '^%d+$') and raw + 0
          if not x or x > MAX_EXACT then
            -- Corrupt state stays as it was, to be reported again.
            call('SET', key, raw, 'KEEPTTL')
            reply[r + 1] = 'ERR statehouse: corrupt state at key ' .. key .. ': field tat is '
              .. raw .. CORRUPT
            r = r + 1
          elseif x <= now then
            -- The arrival time has passed: tat = now, written above.
            reply[r + 1], reply[r + 2] = fe_remaining, fe_reset
            r = r + 2
          else
            -- gcra on tat = x, as the general code decides and writes it.
            local cost, p, tolerance = fe[5], fe[7], fe[8]
            local new_tat = x + cost * p
            local wexp
            if new_tat - now <= tolerance then
              reply[r + 1], reply[r + 2] = floor((tolerance - (new_tat - now)) / p), new_tat - now
              r = r + 2
              wexp = new_tat
            else
              local room = tolerance - (x - now)
              if room < 0 then
                room = 0
              end
              reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4], reply[r + 5], reply[r + 6] =
                -1, 0, floor(room / p), x - now, new_tat - now - tolerance, 0
              r = r + 6
              -- Denied on a later arrival time: put it back.
              wexp = x
            end
            local ttl = 0
            if wexp > now then
              ttl = floor((wexp - now + 999) / 1000)
            end
            ttl = ttl + slack_ms
            if ttl < 1 then
              ttl = 1
            end
            call('SET', key, format('%d', wexp), 'PX', format('%d', ttl))
          end
        end
      end
      i = i + 1
    end
    if i > n then
      break
    end
  end

  local key, now, wcode, w1, w2, w3, wexp
  if i <= n then
    -- Decide check i.
    key = KEYS[i]
    local b = base + (i - 1) * per
    local consume, write = consume_all, write_all
    local code, a, p, cost
    if independent then
      local s = ARGV[b + 1]
      local spec = number_of[s]
      if spec == nil then
        spec = tonumber(s) or 0
        number_of[s] = spec
      end
      consume = spec > 0
      write = consume
      if spec < 0 then
        spec = -spec
      end
      code, a, p = policies[3 * spec - 2], policies[3 * spec - 1], policies[3 * spec]
      s = ARGV[b + 2]
      cost = number_of[s]
      if cost == nil then
        -- nil (not a number) is not memoized: the check fails below.
        cost = tonumber(s)
        number_of[s] = cost
      end
      local t = ''
      if caller_times then
        t = ARGV[b + 3]
      end
      if t == '' then
        if server_now == nil then
          local tt = call('TIME')
          server_now = tonumber(tt[1]) * 1000000 + tonumber(tt[2])
        end
        now = server_now
      else
        now = tonumber(t)
      end
    else
      code, a, p, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
        tonumber(ARGV[b + 4])
      now = batch_now
    end
    if now == nil or code == nil or a == nil or p == nil or cost == nil then
      error(redis.error_reply('ERR statehouse: invalid arguments for check ' .. i))
    end
    local allowed, remaining, reset_after, retry_after, delay = false, 0, 0, -1, 0
    local bad = nil

    if code == 6 or code == 5 then
      -- gcra, leaky bucket: one STRING, the theoretical arrival time.
      local tat = now
      local raw = false
      -- Whether this check's optimistic state is already written (see below).
      local written = false
      if write and not deferred and set_get and (code == 5 or cost <= a) then
        -- Optimistic write: a key that is absent or whose theoretical arrival time has passed
        -- decides as tat = now, which always admits (gcra: cost <= burst; leaky bucket: no
        -- delay) and leaves now + cost * interval behind. That is by far the common case, so
        -- that state is written first, and `SET ... GET` returns what was there: one command
        -- instead of GET then SET. When the old time turns out to be later than now, the
        -- decision below is made on it and the key is written again (admitted) or given its
        -- old time back (denied): the script is atomic, so no client ever sees the guess.
        -- A key of another type fails with WRONGTYPE and is not touched.
        local new_tat = now + cost * p
        local ttl = floor((new_tat - now + 999) / 1000) + slack_ms
        if ttl < 1 then
          ttl = 1
        end
        local new_tat_s, ttl_s = string_of[new_tat], string_of[ttl]
        if new_tat_s == nil then
          new_tat_s = format('%d', new_tat)
          string_of[new_tat] = new_tat_s
        end
        if ttl_s == nil then
          ttl_s = format('%d', ttl)
          string_of[ttl] = ttl_s
        end
        raw = pcall_redis('SET', key, new_tat_s, 'PX', ttl_s, 'GET')
        if type(raw) == 'table' and not match(raw.err or '', 'WRONGTYPE') then
          -- A server before 6.2 (syntax error) or one refusing writes: read, as they do.
          set_get = false
          raw = pcall_redis('GET', key)
        elseif type(raw) ~= 'table' then
          written = true
        end
      else
        raw = pcall_redis('GET', key)
      end
      if raw then
        if type(raw) == 'table' then
          bad = raw.err
        else
          local x = #raw <= 16 and match(raw, '^%d+$') and tonumber(raw)
          if not x or x > MAX_EXACT then
            bad = 'ERR statehouse: corrupt state at key ' .. key .. ': field tat is ' .. raw .. CORRUPT
          elseif x > now then
            tat = x
          end
        end
      end
      if bad == nil then
        if code == 6 then
          -- gcra: a = burst, p = interval.
          local tolerance = a * p
          local new_tat = tat + cost * p
          if new_tat - now <= tolerance then
            allowed = true
            remaining = floor((tolerance - (new_tat - now)) / p)
            reset_after = new_tat - now
            if write then
              wcode, w1, wexp = 6, new_tat, new_tat
            end
          else
            local room = tolerance - (tat - now)
            if room < 0 then
              room = 0
            end
            remaining = floor(room / p)
            reset_after = tat - now
            retry_after = new_tat - now - tolerance
          end
        else
          -- leaky bucket: a = max_delay, p = interval.
          local wait = tat - now
          if wait <= a then
            local new_tat = tat + cost * p
            local queued = new_tat - now
            -- How many more single-unit requests could still be queued behind this one.
            if queued <= a then
              remaining = floor((a - queued) / p) + 1
            end
            allowed = true
            reset_after = queued
            delay = wait
            if write then
              wcode, w1, wexp = 5, new_tat, new_tat
            end
          else
            reset_after = wait
            retry_after = wait - a
          end
        end
        if written then
          if tat == now then
            -- The guess was right: written above, with the same value and expiry.
            wcode = nil
          elseif not allowed then
            -- Denied on a later arrival time: put it back (with the expiry it calls for).
            wcode, w1, wexp = code, tat, tat
          end
        end
      elseif written then
        -- Corrupt state stays as it was, to be reported again; it keeps the expiry just set.
        call('SET', key, raw, 'KEEPTTL')
      end
    elseif code == 1 or code == 3 or code == 4 then
      -- fixed window, sliding counter, token bucket: one HASH of integers.
      local raw
      if code == 1 then
        raw = pcall_redis('HMGET', key, 'w', 'c')
      elseif code == 3 then
        raw = pcall_redis('HMGET', key, 'w', 'c', 'p')
      else
        raw = pcall_redis('HMGET', key, 't', 'l')
      end
      local st = false
      if raw.err then
        bad = raw.err
      else
        local present = false
        for f = 1, #raw do
          if raw[f] then
            present = true
          end
        end
        -- A hash holding none of the fields is not ours either.
        if present or call('EXISTS', key) == 1 then
          for f = 1, #raw do
            local v = raw[f]
            local x = v and #v <= 16 and match(v, '^%d+$') and tonumber(v)
            if not x or x > MAX_EXACT then
              local names = code == 4 and 'tl' or 'wcp'
              bad = 'ERR statehouse: corrupt state at key ' .. key .. ': field '
                .. string.sub(names, f, f) .. ' is ' .. tostring(v or '(missing)') .. CORRUPT
              break
            end
            raw[f] = x
          end
          st = bad == nil
        end
      end
      if bad == nil then
        if code == 1 then
          -- fixed window: a = limit, p = period.
          local window = floor(now / p)
          local count = 0
          -- A window from the future (the clock stepped back) still counts: never more
          -- permissive.
          if st and raw[1] >= window then
            window = raw[1]
            count = raw[2]
          end
          local window_end = (window + 1) * p
          reset_after = window_end > now and window_end - now or 0
          if count + cost <= a then
            allowed = true
            remaining = a - count - cost
            if write then
              wcode, w1, w2, wexp = 1, window, count + cost, window_end
            end
          else
            remaining = a > count and a - count or 0
            retry_after = reset_after
          end
        elseif code == 3 then
          -- sliding counter: a = limit, p = period.
          local window = floor(now / p)
          local current, previous = 0, 0
          if st then
            if raw[1] >= window then
              -- Same window, or one from the future (clock stepped back): counts in full.
              window = raw[1]
              current = raw[2]
              previous = raw[3]
            elseif raw[1] + 1 == window then
              previous = raw[2]
            end
          end
          local window_start = window * p
          local elapsed = now > window_start and now - window_start or 0
          if elapsed > p - 1 then
            elapsed = p - 1
          end
          -- weighted_previous: floor(previous * (period - elapsed) / period) in doubles,
          -- operation for operation as Rust's.
          local estimate = floor(previous * (p - elapsed) / p) + current
          if estimate + cost <= a then
            allowed = true
            remaining = a - estimate - cost
            local current_after = current
            if consume then
              current_after = current + cost
            end
            local reset_at = window_start + p
            if current_after > 0 then
              reset_at = window_start + 2 * p
            end
            reset_after = reset_at > now and reset_at - now or 0
            if write then
              wcode, w1, w2, w3, wexp = 3, window, current_after, previous, window_start + 2 * p
            end
          else
            -- least_elapsed_within: the least e in lo..=period with
            -- weighted_previous(weight, period, e) <= room.
            local weight, room, lo, retry_at
            if current + cost <= a then
              -- Within this window, once the previous window's weight has decayed enough.
              weight, room, lo, retry_at = previous, a - cost - current, elapsed + 1, window_start
            else
              -- In the next window, where this window's count becomes the weighted previous one.
              weight, room, lo, retry_at = current, a - cost, 0, window_start + p
            end
            local hi = p
            while lo < hi do
              local mid = floor((lo + hi) / 2)
              if floor(weight * (p - mid) / p) <= room then
                hi = mid
              else
                lo = mid + 1
              end
            end
            retry_at = retry_at + lo
            local reset_at = window_start + p
            if current > 0 then
              reset_at = window_start + 2 * p
            end
            remaining = a > estimate and a - estimate or 0
            reset_after = reset_at > now and reset_at - now or 0
            retry_after = retry_at > now and retry_at - now or 0
          end
        else
          -- token bucket: a = capacity (burst), p = interval.
          local tokens, last = a, now
          if st then
            tokens, last = raw[1], raw[2]
          end
          if now > last then
            local credited = floor((now - last) / p)
            if credited > 0 then
              tokens = tokens + credited
              if tokens > a then
                tokens = a
              end
              if tokens == a then
                last = now
              else
                last = last + credited * p
              end
            end
          end
          -- time_to(have, want): from `now` until the bucket holds `want` tokens, given `have`
          -- credited up to `last`.
          local have = tokens
          if tokens >= cost then
            allowed = true
            have = tokens - cost
            remaining = have
          else
            remaining = tokens
            local at = last + (cost - tokens) * p
            retry_after = at > now and at - now or 0
          end
          if have < a then
            local at = last + (a - have) * p
            reset_after = at > now and at - now or 0
          end
          if allowed and write then
            wcode, w1, w2, wexp = 4, have, last, now + reset_after
          end
        end
      end
    elseif code == 2 then
      -- sliding log: a = limit, p = period. An entry counts while `ts + period > now`, i.e.
      -- `ts > now - period`.
      local live_from = '(' .. format('%d', now - p)
      local used = pcall_redis('ZCOUNT', key, live_from, '+inf')
      local newest = nil
      if type(used) == 'table' then
        bad = used.err
      elseif used > 0 then
        local last = call('ZRANGE', key, -1, -1, 'WITHSCORES')
        local s = last[2]
        local x = type(s) == 'string' and #s <= 16 and match(s, '^%d+$') and tonumber(s)
        if not x or x > MAX_EXACT then
          bad = 'ERR statehouse: corrupt state at key ' .. key .. ': field score is '
            .. tostring(s) .. CORRUPT
        end
        newest = x
      end
      if bad == nil then
        if used + cost <= a then
          allowed = true
          remaining = a - used - cost
          -- Both branches of the Rust code end at max(newest, now).
          local newest_after = now
          if newest and newest > now then
            newest_after = newest
          end
          reset_after = newest_after + p - now
          if write then
            wcode, w1, w2, wexp = 2, p, cost, newest_after + p
          end
        else
          -- Wait until enough of the oldest entries have left the window.
          local row = call('ZRANGEBYSCORE', key, live_from, '+inf', 'WITHSCORES', 'LIMIT',
            format('%d', used + cost - a - 1), 1)
          local s = row[2]
          local oldest = type(s) == 'string' and #s <= 16 and match(s, '^%d+$') and tonumber(s)
          if not oldest or oldest > MAX_EXACT then
            bad = 'ERR statehouse: corrupt state at key ' .. key .. ': field score is '
              .. tostring(s) .. CORRUPT
          else
            local newest_or_now = newest or now
            remaining = a > used and a - used or 0
            local at = oldest + p
            retry_after = at > now and at - now or 0
            at = newest_or_now + p
            reset_after = at > now and at - now or 0
          end
        end
      end
    else
      error(redis.error_reply('ERR statehouse: unknown algorithm code ' .. tostring(code)))
    end

    if bad ~= nil then
      if not independent then
        error(redis.error_reply(bad))
      end
      reply[r + 1] = bad
      r = r + 1
    elseif independent and allowed and delay == 0 then
      -- Admitted at once (retry_after is -1): the packed form.
      reply[r + 1], reply[r + 2] = remaining, reset_after
      r = r + 2
    else
      local flag = 1
      if not allowed then
        flag = 0
        all_allowed = false
      end
      if independent then
        reply[r + 1] = -1
        r = r + 1
      end
      reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4], reply[r + 5] =
        flag, remaining, reset_after, retry_after, delay
      r = r + 5
      if deferred then
        -- Written in the second half of the loop, if every check admits.
        local s = (i - 1) * 6
        pending[s + 1] = wcode or false
        pending[s + 2], pending[s + 3], pending[s + 4], pending[s + 5], pending[s + 6] =
          w1, w2, w3, wexp, now
        wcode = nil
      end
    end
  else
    -- Write check i - n of a consume of several checks.
    if not all_allowed then
      break
    end
    local j = i - n
    local s = (j - 1) * 6
    key = KEYS[j]
    wcode = pending[s + 1]
    w1, w2, w3, wexp, now = pending[s + 2], pending[s + 3], pending[s + 4], pending[s + 5],
      pending[s + 6]
  end

  if wcode then
    -- The key lives until its state stops mattering, plus the slack; at least 1 ms.
    local ttl = 0
    if wexp > now then
      ttl = floor((wexp - now + 999) / 1000)
    end
    ttl = ttl + slack_ms
    if ttl < 1 then
      ttl = 1
    end
    if wcode == 6 or wcode == 5 then
      call('SET', key, format('%d', w1), 'PX', format('%d', ttl))
    else
      if wcode == 1 then
        call('HSET', key, 'w', format('%d', w1), 'c', format('%d', w2))
      elseif wcode == 3 then
        call('HSET', key, 'w', format('%d', w1), 'c', format('%d', w2), 'p', format('%d', w3))
      elseif wcode == 4 then
        call('HSET', key, 't', format('%d', w1), 'l', format('%d', w2))
      else
        -- sliding log: w1 = period, w2 = cost.
        call('ZREMRANGEBYSCORE', key, '-inf', format('%d', now - w1))
        local score = format('%d', now)
        local added, m = 0, 0
        -- The same microsecond can come again (caller-supplied time), so members are probed
        -- with NX until `cost` new ones are in; in chunks, since a cost can be 100000.
        while added < w2 do
          local args = { 'ZADD', key, 'NX' }
          for _ = 1, math.min(w2 - added, CHUNK) do
            args[#args + 1] = score
            args[#args + 1] = score .. '-' .. m
            m = m + 1
          end
          added = added + call(unpack(args))
        end
      end
      call('PEXPIRE', key, format('%d', ttl))
    end
  end
  i = i + 1
end

reply[1] = batch_now or server_now or 0
return reply
