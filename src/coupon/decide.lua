#!lua
-- Decides one batch of coupon requests atomically (docs/contract.md §2).
--
-- KEYS[1] queue ZSET, KEYS[2] dead-letter STREAM, KEYS[3] outbox ZSET, KEYS[4] ranking-log
-- STREAM, KEYS[5] ranking-log row counter STRING, then for each coupon c (1-based) four keys at
-- 5 + 4(c-1) + 1..4: stock STRING, issued SET, seq STRING, result HASH.
-- ARGV[1] number of coupons, ARGV[2] number of entries, then 3 arguments per entry:
-- member, coupon index (0 = malformed), and the userId (or, for a malformed entry, the reason).
-- The last key, KEYS[#KEYS], is the lane's reconciliation marker (see below).
--
-- Returns an array: first a string with one character per entry, in input order — I(ssued),
-- D(uplicate), S(old out), U(nknown coupon), X (dead-lettered: moved to the stream) or G(one: no
-- longer in the queue, another replica decided it first) — then one rank per entry (1-based
-- arrival order among the coupon's decided requests; 0 unless decided).
--
-- All-or-nothing, per coupon: a failing redis.call does not undo the writes before it, so every
-- call that could fail is either a read made before the coupon's first write, or a redis.pcall
-- whose failure writes nothing and undoes the coupon's earlier writes (SREM of the user just
-- added) before its requests are dead-lettered; seq is written only for coupons decided. Key names arrive in KEYS,
-- never built here, so the script works on Redis Cluster when they share a hash slot. userIds
-- stay strings: Lua numbers are doubles and cannot hold every i64.
--
-- The batch's ranking-log rows (one per decided request) go into the log stream as ONE entry,
-- written with the decisions, so a decision and its row exist together or not at all. Fields:
-- `m` the decided members joined by spaces (decided members are `digits:digits`), `r` their ranks
-- joined by spaces, `o` their outcome letters (I/D/S/U), in the same order; the entry id's
-- milliseconds (Redis' clock) are the decision time. The counter adds the rows for the backlog
-- metric. Nothing is logged for a batch with no decided request. (Two table appends per entry
-- and one XADD per batch: table.concat builds the fields in C.)
--
-- Speed: a batch can span a thousand coupons, so the cost per distinct coupon is what counts
-- (issue 19): every call from Lua costs a few tenths of a microsecond even when it does nothing,
-- a write more.
-- Per coupon the script makes only the calls whose writes the decision needs anyway, and learns
-- the keys' types from their errors (redis.pcall) instead of asking TYPE: stock and seq of every
-- coupon come from one MGET; SADD of a lone request's user answers whether they already held it
-- (when stock is left; otherwise SISMEMBER, or one SMISMEMBER for several requests); one HSET
-- writes the results; DECRBY takes what was issued (DECRBY, not a bulk MSET: the stock key is the
-- API's, and a SET would drop a TTL it may carry); every decided coupon's new seq is written by
-- one MSET at the end. So a coupon with one request costs 2 calls (3 when it issues). Inside one
-- script nothing can interleave, so deciding coupon after coupon is the same as deciding entry by
-- entry; the queue removal, outbox, dead letters, seq and log entry are written in bulk at the
-- end, in queue order. A member is unique in the queue, so a batch holds at most one request per
-- (user, coupon). TYPE is asked only when MGET finds no string and EXISTS says such a key exists,
-- and to word a dead letter's reason.

local queue, dead, outbox, log, log_rows = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local FIRST_COUPON_KEY = 5

-- Never decide against a Redis that forgot (docs/contract.md §2, README "When Redis forgets"): the
-- marker holds the identity (run_id, which changes on every restart, restore and failover, and
-- the replication id) of the Redis last reconciled from MySQL. Any other Redis — restarted from
-- an older snapshot, a promoted lagging replica, an empty one — refuses with UNRECONCILED and
-- writes nothing; the worker reconciles it from user_coupon and sets the marker. The check runs
-- here, inside the atomic step, so no reconnect can slip between check and decision.
do
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  local identity = (run_id or '?') .. ':' .. (replid or '?')
  if redis.call('GET', KEYS[#KEYS]) ~= identity then
    return redis.error_reply('UNRECONCILED Redis ' .. identity .. ' has not been reconciled from MySQL')
  end
end
local nentries = tonumber(ARGV[2])
-- Issue time from Redis' clock, the same for every replica: the outbox score, later issued_at.
local now = redis.call('TIME')
local issued_at_ms = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))

local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

for _, spec in ipairs({
  { queue, 'zset' }, { dead, 'stream' }, { outbox, 'zset' }, { log, 'stream' }, { log_rows, 'string' },
}) do
  local t = key_type(spec[1])
  if t ~= 'none' and t ~= spec[2] then
    return redis.error_reply('WRONGTYPE ' .. spec[1] .. ' is a ' .. t .. ', expected a ' .. spec[2])
  end
end

local function is_count(s)
  return s == '0' or (string.match(s, '^[1-9]%d*$') ~= nil and #s <= 18)
end

local function shorten(s)
  if #s > 40 then return string.sub(s, 1, 40) .. '...' end
  return s
end

-- Variadic commands in slices: unpack() can spread at most ~8000 values onto Lua's stack. With
-- `key` nil the items are the keys (MGET).
local SLICE = 4000
local function bulk(command, key, option, items, step)
  local replies = nil
  local size = SLICE - SLICE % step
  for first = 1, #items, size do
    local last = math.min(first + size - 1, #items)
    local reply
    if key == nil then
      reply = redis.call(command, unpack(items, first, last))
    elseif option then
      reply = redis.call(command, key, option, unpack(items, first, last))
    else
      reply = redis.call(command, key, unpack(items, first, last))
    end
    if replies == nil then
      replies = reply
    elseif type(reply) == 'table' then
      for _, value in ipairs(reply) do replies[#replies + 1] = value end
    end
  end
  return replies or {}
end

-- Read: which entries are still queued.
local members, cidx, user_or_reason = {}, {}, {}
for i = 1, nentries do
  local a = 2 + (i - 1) * 3
  members[i], cidx[i], user_or_reason[i] = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
end
-- Usually the batch is still exactly the head of the queue (one drainer, arrivals at the tail):
-- one ZRANGE confirms it, and ZREMRANGEBYRANK later removes it without a lookup per member.
-- Otherwise (another replica took some, earlier-scored arrivals) ZMSCORE says which are left.
local head = redis.call('ZRANGE', queue, 0, nentries - 1)
local whole_head = #head == nentries
for i = 1, nentries do
  if not whole_head then break end
  whole_head = head[i] == members[i]
end
local scores
if whole_head then
  scores = {}
  for i = 1, nentries do scores[i] = true end
else
  scores = bulk('ZMSCORE', queue, nil, members, 1)
end

-- The coupons with an entry still queued, in first-seen order (`live`), and each one's entries
-- chained in queue order (`first[c]`, then `nxt[i]`), without a table per coupon.
local live, first, last, count, nxt = {}, {}, {}, {}, {}
for i = 1, nentries do
  local c = cidx[i]
  if c > 0 and scores[i] then
    if first[c] == nil then
      live[#live + 1] = c
      first[c], count[c] = i, 1
    else
      nxt[last[c]] = i
      count[c] = count[c] + 1
    end
    last[c] = i
  end
end

local function failed(reply)
  return type(reply) == 'table' and reply['err'] ~= nil
end
local function wrong_type(key)
  return 'wrong type: ' .. key .. ' is a ' .. key_type(key)
end

-- `s + n` for a count `s` (at most 18 digits) and 0 < n < 1e9, as a string, exactly: Lua numbers
-- are doubles, exact only below 2^53, so a long count is added in two halves of 9 digits.
local function add(s, n)
  if #s <= 15 then return string.format('%.0f', tonumber(s) + n) end
  local hi, lo = tonumber(string.sub(s, 1, -10)), tonumber(string.sub(s, -9)) + n
  if lo >= 1e9 then hi, lo = hi + 1, lo - 1e9 end
  return string.format('%.0f%09.0f', hi, lo)
end

-- Every live coupon's stock and seq in one read (stock at 2k - 1, seq at 2k).
local read_keys = {}
for k, c in ipairs(live) do
  local base = FIRST_COUPON_KEY + (c - 1) * 4
  read_keys[2 * k - 1], read_keys[2 * k] = KEYS[base + 1], KEYS[base + 3]
end
local values = bulk('MGET', nil, nil, read_keys, 1)
-- MGET answers nil for a missing key and for one that is not a string. One EXISTS over all of
-- those says whether any exists at all (usually none: new coupons' seq, unknown coupons' stock);
-- only then is TYPE asked, key by key.
local absent = {}
for j = 1, #read_keys do
  if values[j] == false then absent[#absent + 1] = read_keys[j] end
end
local some_absent_exist = false
for first = 1, #absent, SLICE do
  if redis.call('EXISTS', unpack(absent, first, math.min(first + SLICE - 1, #absent))) > 0 then
    some_absent_exist = true
    break
  end
end
local function absent_type(key)
  if some_absent_exist then return key_type(key) end
  return 'none'
end

-- Decide and write coupon by coupon. codes[i] and ranks[i] are set for each decided entry; a
-- coupon that cannot be decided gets its reason in undecidable[c] and nothing written. The
-- decided coupons' new seq values are written together at the end (`seq_writes`, one MSET:
-- seq is the worker's own key, a string whose value was just read).
local codes, ranks, undecidable, seq_writes = {}, {}, {}, {}
for k, c in ipairs(live) do
  local base = FIRST_COUPON_KEY + (c - 1) * 4
  local stock_key, issued_key, seq_key, result_key = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4]
  local stock, seq, n, i, reason, unknown = values[2 * k - 1], values[2 * k], count[c], first[c], nil, false
  if stock == false then
    local t = absent_type(stock_key)
    if t == 'none' then
      unknown = true
    else
      reason = 'wrong type: ' .. stock_key .. ' is a ' .. t
    end
  elseif not is_count(stock) then
    reason = 'stock is not a non-negative integer: ' .. shorten(stock)
  else
    stock = tonumber(stock)
  end
  if reason ~= nil then
    -- The stock's reason comes first.
  elseif seq == false then
    local t = absent_type(seq_key)
    if t == 'none' then
      seq = '0'
    else
      reason = 'wrong type: ' .. seq_key .. ' is a ' .. t
    end
  end
  -- seq after this batch: at most 18 digits, as every count here.
  local before, after = 0, nil
  if reason == nil then
    if is_count(seq) then after = add(seq, n) end
    if after == nil or #after > 18 then
      reason = 'seq is not an integer: ' .. shorten(seq)
    else
      before = tonumber(seq)
    end
  end

  if reason ~= nil then
    -- Nothing to write.
  elseif n == 1 and not unknown and stock > 0 then
    -- One request and stock left: SADD answers whether the user already held the coupon.
    local user = user_or_reason[i]
    local added = redis.pcall('SADD', issued_key, user)
    if failed(added) then
      reason = wrong_type(issued_key)
    else
      -- A holder's result is ISSUED (written with the SADD that made them one) and ISSUED is
      -- never overwritten; HSETNX covers holders added by other means, who have none.
      local written
      if added == 1 then
        written = redis.pcall('HSET', result_key, user, 'ISSUED')
      else
        written = redis.pcall('HSETNX', result_key, user, 'DUPLICATE')
      end
      if failed(written) then
        reason = wrong_type(result_key)
        if added == 1 then redis.call('SREM', issued_key, user) end
      elseif added == 1 then
        codes[i] = 'I'
        redis.call('DECRBY', stock_key, 1)
      else
        codes[i] = 'D'
      end
      if codes[i] then ranks[i] = before + 1 end
    end
  elseif n == 1 then
    -- One request, none left to issue or an unknown coupon: who holds it already.
    local user = user_or_reason[i]
    local held = redis.pcall('SISMEMBER', issued_key, user)
    if failed(held) then
      reason = wrong_type(issued_key)
    else
      local code, written
      if held == 1 then
        code = 'D'
        if unknown then code = 'U' end
        written = redis.pcall('HSETNX', result_key, user, unknown and 'UNKNOWN_COUPON' or 'DUPLICATE')
      else
        code = 'S'
        if unknown then code = 'U' end
        written = redis.pcall('HSET', result_key, user, unknown and 'UNKNOWN_COUPON' or 'SOLD_OUT')
      end
      if failed(written) then
        reason = wrong_type(result_key)
      else
        codes[i], ranks[i] = code, before + 1
      end
    end
  else
    -- Several requests: who holds it already, one SMISMEMBER.
    local users, m, j = {}, 0, i
    while j do
      m = m + 1
      users[m] = user_or_reason[j]
      j = nxt[j]
    end
    local ok, held = pcall(bulk, 'SMISMEMBER', issued_key, nil, users, 1)
    if not ok then
      reason = wrong_type(issued_key)
    else
      local taken, results, holders, new_holders = 0, {}, {}, {}
      local d = 0
      j = i
      while j do
        d = d + 1
        local user, code, outcome = users[d], nil, nil
        if unknown then
          code, outcome = 'U', 'UNKNOWN_COUPON'
        elseif held[d] == 1 then
          code, outcome = 'D', 'DUPLICATE'
        elseif stock - taken <= 0 then
          code, outcome = 'S', 'SOLD_OUT'
        else
          code, outcome = 'I', 'ISSUED'
          taken = taken + 1
          new_holders[#new_holders + 1] = user
        end
        codes[j], ranks[j] = code, before + d
        local into = results
        if held[d] == 1 then into = holders end
        into[#into + 1] = user
        into[#into + 1] = outcome
        j = nxt[j]
      end
      -- The first write to the result hash checks its type: on failure nothing was written to it.
      ok = true
      if #results > 0 then ok = pcall(bulk, 'HSET', result_key, nil, results, 2) end
      for h = 1, #holders, 2 do
        if not ok then break end
        ok = not failed(redis.pcall('HSETNX', result_key, holders[h], holders[h + 1]))
      end
      if ok then
        bulk('SADD', issued_key, nil, new_holders, 1)
        if taken > 0 then redis.call('DECRBY', stock_key, taken) end
      else
        reason = wrong_type(result_key)
        j = i
        while j do
          codes[j], ranks[j] = nil, nil
          j = nxt[j]
        end
      end
    end
  end
  if reason == nil then
    seq_writes[#seq_writes + 1] = seq_key
    seq_writes[#seq_writes + 1] = after
  end
  undecidable[c] = reason
end
bulk('MSET', nil, nil, seq_writes, 2)

-- In queue order: the claimed entries, dead letters, outbox and log rows.
local out_codes, claimed, outbox_adds = {}, {}, {}
local log_members, log_ranks, log_codes = {}, {}, {}
for i = 1, nentries do
  local member, code = members[i], 'G'
  if scores[i] then
    claimed[#claimed + 1] = member
    code = codes[i]
    if code == nil then
      local reason = user_or_reason[i]
      if cidx[i] > 0 then reason = undecidable[cidx[i]] end
      local score = scores[i]
      if score == true then score = redis.call('ZSCORE', queue, member) end
      redis.call('XADD', dead, '*', 'member', member, 'score', score, 'reason', reason)
      code = 'X'
    else
      local n = #log_members + 1
      log_members[n], log_ranks[n], log_codes[n] = member, ranks[i], code
      if code == 'I' then
        outbox_adds[#outbox_adds + 1] = issued_at_ms
        outbox_adds[#outbox_adds + 1] = member
      end
    end
  end
  out_codes[i] = code
end

if whole_head then
  redis.call('ZREMRANGEBYRANK', queue, 0, nentries - 1)
else
  bulk('ZREM', queue, nil, claimed, 1)
end
bulk('ZADD', outbox, 'NX', outbox_adds, 2)
if #log_members > 0 then
  redis.call('XADD', log, '*', 'm', table.concat(log_members, ' '), 'r', table.concat(log_ranks, ' '),
    'o', table.concat(log_codes))
  redis.call('INCRBY', log_rows, #log_members)
end

local out = { table.concat(out_codes) }
for i = 1, nentries do
  local rank = 0
  if out_codes[i] ~= 'G' and out_codes[i] ~= 'X' then rank = ranks[i] end
  out[i + 1] = rank
end
return out
