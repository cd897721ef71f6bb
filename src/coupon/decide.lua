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
-- All-or-nothing: a failing redis.call does not undo the writes before it, so every call that
-- could fail (a key of the wrong type, stock and seq values) runs before the first write. Key
-- names arrive in KEYS, never built here, so the script works on Redis Cluster when they share a
-- hash slot. userIds stay strings: Lua numbers are doubles and cannot hold every i64.
--
-- The batch's ranking-log rows (one per decided request) go into the log stream as ONE entry,
-- written with the decisions, so a decision and its row exist together or not at all. Fields:
-- `m` the decided members joined by spaces (decided members are `digits:digits`), `r` their ranks
-- joined by spaces, `o` their outcome letters (I/D/S/U), in the same order; the entry id's
-- milliseconds (Redis' clock) are the decision time. The counter adds the rows for the backlog
-- metric. Nothing is logged for a batch with no decided request. (Two table appends per entry
-- and one XADD per batch: table.concat builds the fields in C.)
--
-- Speed: Redis commands are issued in bulk (ZRANGE or ZMSCORE, one MGET for every coupon's stock
-- and seq, SMISMEMBER, then one removal, SADD, HSET, ZADD per key) rather than per entry; inside
-- one script nothing can interleave, so reading the whole batch first and writing it after is the
-- same as deciding entry by entry. A member is unique in the queue, so a batch holds at most one
-- request per (user, coupon). A batch can span a thousand coupons, so the calls per coupon are
-- few: the type of a coupon's keys is learned from the reads the decision needs anyway (MGET
-- answers nil for a missing or non-string key, and only then is TYPE asked; SMISMEMBER fails on
-- a non-set, caught with pcall), and only coupons with an entry still queued are looked at.
-- The result hash is the one key the decision never reads: HLEN, the cheapest read there is,
-- checks its type.

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

-- The coupons with an entry still queued, in first-seen order, and their entries.
local coupons, live = {}, {}
for i = 1, nentries do
  local c = cidx[i]
  if c > 0 and scores[i] then
    local info = coupons[c]
    if info == nil then
      local base = FIRST_COUPON_KEY + (c - 1) * 4
      info = {
        stock_key = KEYS[base + 1], issued_key = KEYS[base + 2],
        seq_key = KEYS[base + 3], result_key = KEYS[base + 4],
        taken = 0, decided = 0, entries = {}, users = {}, new_holders = {}, results = {},
      }
      coupons[c] = info
      live[#live + 1] = info
    end
    info.entries[#info.entries + 1] = i
    info.users[#info.users + 1] = user_or_reason[i]
  end
end

-- Validate every live coupon's keys before any write, reading what the decision needs.
local string_keys = {}
for k, info in ipairs(live) do
  string_keys[2 * k - 1], string_keys[2 * k] = info.stock_key, info.seq_key
end
local values = bulk('MGET', nil, nil, string_keys, 2)
local function wrong_type(key)
  return 'wrong type: ' .. key .. ' is a ' .. key_type(key)
end
local holds = {}
for k, info in ipairs(live) do
  local stock, seq = values[2 * k - 1], values[2 * k]
  if seq == false and key_type(info.seq_key) ~= 'none' then
    info.dead = wrong_type(info.seq_key)
  elseif seq and not is_count(seq) then
    info.dead = 'seq is not an integer: ' .. shorten(seq)
  elseif stock == false then
    if key_type(info.stock_key) == 'none' then
      info.unknown = true
    else
      info.dead = wrong_type(info.stock_key)
    end
  elseif not is_count(stock) then
    info.dead = 'stock is not a non-negative integer: ' .. shorten(stock)
  else
    info.stock = tonumber(stock)
  end
  info.seq = tonumber(seq or '0')
  if info.dead == nil then
    local ok, held = pcall(bulk, 'SMISMEMBER', info.issued_key, nil, info.users, 1)
    if not ok then
      info.dead = wrong_type(info.issued_key)
    else
      for n, i in ipairs(info.entries) do holds[i] = held[n] == 1 end
    end
  end
  if info.dead == nil and type(redis.pcall('HLEN', info.result_key)) == 'table' then
    info.dead = wrong_type(info.result_key)
  end
end

-- Decide, in queue order.
local codes, ranks, claimed, outbox_adds = {}, {}, {}, {}
local log_members, log_ranks, log_codes = {}, {}, {}
for i = 1, nentries do
  local member, user, info = members[i], user_or_reason[i], coupons[cidx[i]]
  local code, rank = 'G', 0
  if scores[i] then
    claimed[#claimed + 1] = member
    if info == nil or info.dead ~= nil then
      local reason = user
      if info ~= nil then reason = info.dead end
      local score = scores[i]
      if score == true then score = redis.call('ZSCORE', queue, member) end
      redis.call('XADD', dead, '*', 'member', member, 'score', score, 'reason', reason)
      code = 'X'
    else
      info.decided = info.decided + 1
      rank = info.seq + info.decided
      local outcome
      if info.unknown then
        code, outcome = 'U', 'UNKNOWN_COUPON'
      elseif holds[i] then
        code, outcome = 'D', 'DUPLICATE'
      elseif info.stock - info.taken <= 0 then
        code, outcome = 'S', 'SOLD_OUT'
      else
        code, outcome = 'I', 'ISSUED'
        info.taken = info.taken + 1
        info.new_holders[#info.new_holders + 1] = user
        outbox_adds[#outbox_adds + 1] = issued_at_ms
        outbox_adds[#outbox_adds + 1] = member
      end
      local n = #log_members + 1
      log_members[n], log_ranks[n], log_codes[n] = member, rank, code
      if holds[i] then
        -- A holder's result is ISSUED (written with the SADD that made them one) and ISSUED is
        -- never overwritten; HSETNX covers holders added by other means, who have none.
        redis.call('HSETNX', info.result_key, user, outcome)
      else
        local results = info.results
        results[#results + 1] = user
        results[#results + 1] = outcome
      end
    end
  end
  codes[i] = code
  ranks[i] = rank
end

-- Write.
if whole_head then
  redis.call('ZREMRANGEBYRANK', queue, 0, nentries - 1)
else
  bulk('ZREM', queue, nil, claimed, 1)
end
bulk('ZADD', outbox, 'NX', outbox_adds, 2)
for _, info in ipairs(live) do
  bulk('SADD', info.issued_key, nil, info.new_holders, 1)
  bulk('HSET', info.result_key, nil, info.results, 2)
  if info.taken > 0 then redis.call('DECRBY', info.stock_key, info.taken) end
  if info.decided > 0 then redis.call('INCRBY', info.seq_key, info.decided) end
end
if #log_members > 0 then
  redis.call('XADD', log, '*', 'm', table.concat(log_members, ' '), 'r', table.concat(log_ranks, ' '),
    'o', table.concat(log_codes))
  redis.call('INCRBY', log_rows, #log_members)
end

local out = { table.concat(codes) }
for i = 1, nentries do out[i + 1] = ranks[i] end
return out
