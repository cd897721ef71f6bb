#!lua
-- Decides one batch of coupon requests atomically (CONTRACT.md §2).
--
-- KEYS[1] queue ZSET, KEYS[2] dead-letter STREAM, KEYS[3] outbox ZSET, then for each coupon c
-- (1-based) four keys at 3 + 4(c-1) + 1..4: stock STRING, issued SET, seq STRING, result HASH.
-- ARGV[1] number of coupons, ARGV[2] number of entries, then 5 arguments per entry:
-- member, score, coupon index (0 = malformed), userId, reason (for malformed entries).
--
-- Returns a flat array, 3 items per entry in input order: member, outcome, rank. Outcome is
-- ISSUED, DUPLICATE, SOLD_OUT, UNKNOWN_COUPON, DEAD (moved to the dead-letter stream) or GONE
-- (no longer in the queue: another replica decided it first). Rank is 0 unless decided.
--
-- All-or-nothing: a failing redis.call does not undo the writes before it, so every check that
-- could fail (key types, stock and seq values) runs before the first write. Key names arrive in
-- KEYS, never built here, so the script works on Redis Cluster when they share a hash slot.
-- userIds stay strings: Lua numbers are doubles and cannot hold every i64.

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

local out = {}
for i = 0, nentries - 1 do
  local a = 2 + i * 5
  local member, score = ARGV[a + 1], ARGV[a + 2]
  local cidx, user, reason = tonumber(ARGV[a + 3]), ARGV[a + 4], ARGV[a + 5]
  local outcome, rank = 'GONE', 0
  -- Removing first doubles as the claim: 0 means another replica got here first.
  if redis.call('ZREM', queue, member) == 1 then
    local info = coupons[cidx]
    if info ~= nil and info.dead ~= nil then reason = info.dead end
    if cidx == 0 or info.dead ~= nil then
      redis.call('XADD', dead, '*', 'member', member, 'score', score, 'reason', reason)
      outcome = 'DEAD'
    else
      info.decided = info.decided + 1
      rank = info.seq + info.decided
      if info.unknown then
        outcome = 'UNKNOWN_COUPON'
      elseif redis.call('SISMEMBER', info.issued_key, user) == 1 then
        outcome = 'DUPLICATE'
      elseif info.stock - info.taken <= 0 then
        outcome = 'SOLD_OUT'
      else
        outcome = 'ISSUED'
        info.taken = info.taken + 1
        redis.call('SADD', info.issued_key, user)
        redis.call('ZADD', outbox, 'NX', issued_at_ms, member)
      end
      if outcome == 'ISSUED' or redis.call('HGET', info.result_key, user) ~= 'ISSUED' then
        redis.call('HSET', info.result_key, user, outcome)
      end
    end
  end
  out[#out + 1] = member
  out[#out + 1] = outcome
  out[#out + 1] = rank
end

for c = 1, ncoupons do
  local info = coupons[c]
  if info.taken > 0 then redis.call('DECRBY', info.stock_key, info.taken) end
  if info.decided > 0 then redis.call('INCRBY', info.seq_key, info.decided) end
end

return out
