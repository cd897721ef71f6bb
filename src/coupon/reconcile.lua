-- Puts one chunk of a coupon's user_coupon rows back into Redis (README "When Redis forgets").
--
-- KEYS[1] marker, KEYS[2] stock STRING, KEYS[3] issued SET, KEYS[4] result HASH, KEYS[5] seq.
-- ARGV[1] the identity being reconciled, ARGV[2] '1' for a dry run (nothing written), ARGV[3] a
-- floor for seq (the highest rank in ranking_logs), ARGV[4] stock a dry run's earlier chunks
-- would have taken (0 otherwise), ARGV[5..] userIds holding the coupon in MySQL (at most a few
-- thousand: unpack() spreads them onto Lua's stack).
--
-- Each userId the issued set lacks joins it with ISSUED in the result hash, and the stock is
-- decremented for it — never below 0: what the stock cannot explain is counted and returned
-- (the holder is still added: MySQL is the system of record, and the user must not be issued
-- the coupon a second time). seq is raised to the floor, so new ranks never reuse ones already
-- in ranking_logs.
--
-- Refuses with REDIS_CHANGED (and writes nothing) when this is not the Redis being reconciled.
-- All checks run before the first write. Running it twice is harmless: the second run finds the
-- users in the set and seq at the floor.
--
-- Returns { missing, taken from stock, unexplained, stock after (-1: no stock key), seq raised
-- to (-1: not raised), why the coupon was left alone ('' when it was not) }.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local identity = (run_id or '?') .. ':' .. (replid or '?')
if identity ~= ARGV[1] then
  return redis.error_reply('REDIS_CHANGED Redis is now ' .. identity .. ', reconciling ' .. ARGV[1])
end
local stock_key, issued_key, result_key, seq_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dry = ARGV[2] == '1'

local function is_count(s)
  return s == '0' or (string.match(s, '^[1-9]%d*$') ~= nil and #s <= 18)
end
-- A coupon whose keys the decide script cannot use either (wrong type, stock or seq not an
-- integer) is not touched: its requests are dead-lettered, and reconciliation reports it.
for _, spec in ipairs({ { stock_key, 'string' }, { issued_key, 'set' }, { result_key, 'hash' },
    { seq_key, 'string' } }) do
  local t = redis.call('TYPE', spec[1])['ok']
  if t ~= 'none' and t ~= spec[2] then
    return { 0, 0, 0, -1, -1, spec[1] .. ' is a ' .. t .. ', expected a ' .. spec[2] }
  end
end
local stock_raw = redis.call('GET', stock_key)
if stock_raw and not is_count(stock_raw) then
  return { 0, 0, 0, -1, -1, 'stock is not a non-negative integer' }
end
local seq_raw = redis.call('GET', seq_key)
if seq_raw and not is_count(seq_raw) then
  return { 0, 0, 0, -1, -1, 'seq is not a non-negative integer' }
end

local users = {}
for i = 5, #ARGV do users[#users + 1] = ARGV[i] end
local missing = {}
if #users > 0 then
  local held = redis.call('SMISMEMBER', issued_key, unpack(users))
  for i, h in ipairs(held) do
    if h == 0 then missing[#missing + 1] = users[i] end
  end
end
local stock = -1
local taken, unexplained = 0, #missing
if stock_raw then
  stock = math.max(0, tonumber(stock_raw) - tonumber(ARGV[4]))
  taken = math.min(#missing, stock)
  unexplained = #missing - taken
  stock = stock - taken
end
local floor = tonumber(ARGV[3])
local raised = -1
if floor > tonumber(seq_raw or '0') then raised = floor end

if not dry then
  if #missing > 0 then
    redis.call('SADD', issued_key, unpack(missing))
    local results = {}
    for _, user in ipairs(missing) do
      results[#results + 1] = user
      results[#results + 1] = 'ISSUED'
    end
    redis.call('HSET', result_key, unpack(results))
  end
  if taken > 0 then redis.call('DECRBY', stock_key, taken) end
  if raised >= 0 then redis.call('SET', seq_key, raised) end
end
return { #missing, taken, unexplained, stock, raised, '' }
