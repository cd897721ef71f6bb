#!lua
-- Decides one batch of coupon requests atomically (CONTRACT.md §2).
--
-- KEYS[1] queue ZSET, KEYS[2] dead-letter STREAM, KEYS[3] outbox ZSET, then for each coupon c
-- (1-based) four keys at 3 + 4(c-1) + 1..4: stock STRING, issued SET, seq STRING, result HASH.
-- ARGV[1] number of coupons, ARGV[2] number of entries, then 3 arguments per entry:
-- member, coupon index (0 = malformed), and the userId (or, for a malformed entry, the reason).
--
-- Returns an array: first a string with one character per entry, in input order — I(ssued),
-- D(uplicate), S(old out), U(nknown coupon), X (dead-lettered: moved to the stream) or G(one: no
-- longer in the queue, another replica decided it first) — then one rank per entry (1-based
-- arrival order among the coupon's decided requests; 0 unless decided).
--
-- All-or-nothing: a failing redis.call does not undo the writes before it, so every check that
-- could fail (key types, stock and seq values) runs before the first write. Key names arrive in
-- KEYS, never built here, so the script works on Redis Cluster when they share a hash slot.
-- userIds stay strings: Lua numbers are doubles and cannot hold every i64.
--
-- Speed: Redis commands are issued in bulk (ZRANGE or ZMSCORE, SMISMEMBER, then one removal,
-- SADD, HSET, ZADD per key) rather than per entry; inside one script nothing can interleave, so reading
-- the whole batch first and writing it after is the same as deciding entry by entry. A member is
-- unique in the queue, so a batch holds at most one request per (user, coupon).

local queue, dead, outbox = KEYS[1], KEYS[2], KEYS[3]
local ncoupons = tonumber(ARGV[1])
local nentries = tonumber(ARGV[2])
-- Issue time from Redis' clock, the same for every replica: the outbox score, later issued_at.
local now = redis.call('TIME')
local issued_at_ms = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))

local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

for _, spec in ipairs({ { queue, 'zset' }, { dead, 'stream' }, { outbox, 'zset' } }) do
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

-- Validate every coupon's keys before any write.
local coupons = {}
for c = 1, ncoupons do
  local base = 3 + (c - 1) * 4
  local info = {
    stock_key = KEYS[base + 1], issued_key = KEYS[base + 2],
    seq_key = KEYS[base + 3], result_key = KEYS[base + 4],
    taken = 0, decided = 0,
  }
  local expected = {
    { info.stock_key, 'string' }, { info.issued_key, 'set' },
    { info.seq_key, 'string' }, { info.result_key, 'hash' },
  }
  for _, spec in ipairs(expected) do
    local t = key_type(spec[1])
    if t ~= 'none' and t ~= spec[2] and info.dead == nil then
      info.dead = 'wrong type: ' .. spec[1] .. ' is a ' .. t
    end
  end
  if info.dead == nil then
    local stock = redis.call('GET', info.stock_key)
    local seq = redis.call('GET', info.seq_key)
    if seq and not is_count(seq) then
      info.dead = 'seq is not an integer: ' .. shorten(seq)
    elseif stock == false then
      info.unknown = true
    elseif not is_count(stock) then
      info.dead = 'stock is not a non-negative integer: ' .. shorten(stock)
    else
      info.stock = tonumber(stock)
    end
    info.seq = tonumber(seq or '0')
  end
  coupons[c] = info
end

-- Variadic commands in slices: unpack() can spread at most ~8000 values onto Lua's stack.
local SLICE = 4000
local function bulk(command, key, option, items, step)
  local replies = nil
  local size = SLICE - SLICE % step
  for first = 1, #items, size do
    local last = math.min(first + size - 1, #items)
    local reply
    if option then
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

-- Read: which entries are still queued, and which requesters already hold their coupon.
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

local entries_of, users_of = {}, {}
for c = 1, ncoupons do entries_of[c], users_of[c] = {}, {} end
for i = 1, nentries do
  local c = cidx[i]
  if c > 0 and scores[i] then
    local entries = entries_of[c]
    entries[#entries + 1] = i
    users_of[c][#entries] = user_or_reason[i]
  end
end
local holds = {}
for c = 1, ncoupons do
  local info, entries, users = coupons[c], entries_of[c], users_of[c]
  info.new_holders, info.results = {}, {}
  if info.dead == nil then
    if #users > 0 then
      local held = bulk('SMISMEMBER', info.issued_key, nil, users, 1)
      for k, i in ipairs(entries) do holds[i] = held[k] == 1 end
    end
  end
end

-- Decide, in queue order.
local codes, ranks, claimed, outbox_adds = {}, {}, {}, {}
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
for c = 1, ncoupons do
  local info = coupons[c]
  bulk('SADD', info.issued_key, nil, info.new_holders, 1)
  bulk('HSET', info.result_key, nil, info.results, 2)
  if info.taken > 0 then redis.call('DECRBY', info.stock_key, info.taken) end
  if info.decided > 0 then redis.call('INCRBY', info.seq_key, info.decided) end
end

local out = { table.concat(codes) }
for i = 1, nentries do out[i + 1] = ranks[i] end
return out
