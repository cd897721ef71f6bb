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
-- Runs behind reconcile_prelude.lua (the identity check, read_stock, take_stock). All checks run
-- before the first write. Running it twice is harmless: the second run finds the users in the
-- set and seq at the floor.
--
-- Returns { missing, taken from stock, unexplained, stock after (-1: no stock key), seq raised
-- to (-1: not raised), why the coupon was left alone ('' when it was not) }.
local stock_raw, unusable = read_stock({ { stock_key, 'string' }, { issued_key, 'set' },
  { result_key, 'hash' }, { seq_key, 'string' } })
if unusable then return { 0, 0, 0, -1, -1, unusable } end
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
local stock, taken, unexplained = take_stock(stock_raw, #missing)
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
