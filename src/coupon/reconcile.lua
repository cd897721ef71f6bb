-- Puts one chunk of a coupon's user_coupon rows back into Redis (README "When Redis forgets").
--
-- KEYS[1] marker, KEYS[2] stock STRING, KEYS[3] issued SET, KEYS[4] result HASH, KEYS[5] seq,
-- KEYS[6] the lane's queue ZSET, KEYS[7] the lane's log STREAM, KEYS[8] its row counter.
-- ARGV[1] the identity being reconciled, ARGV[2] '1' for a dry run (nothing written), ARGV[3] a
-- floor for seq (the highest rank in ranking_logs), ARGV[4] stock a dry run's earlier chunks
-- would have taken (0 otherwise), ARGV[5] the couponId, then pairs (userId holding the coupon in
-- MySQL, its issued_at in epoch ms) — at most a few thousand (unpack() spreads them onto Lua's
-- stack).
--
-- Each userId the issued set lacks joins it with ISSUED in the result hash, and the stock is
-- decremented for it — never below 0: what the stock cannot explain is counted and returned
-- (the holder is still added: MySQL is the system of record, and the user must not be issued
-- the coupon a second time). seq is raised to the floor, so new ranks never reuse ones already
-- in ranking_logs.
--
-- Such a holder's decision is unknown to this Redis (had its ranking_logs row been above seq,
-- forgotten.lua would have put it back and removed its request first). When the queue still
-- holds the member scored no later than issued_at, that is the request that issued the coupon —
-- put back by a rollback, or decided by an old primary whose coupon reached user_coupon and
-- whose log row did not (fenced off since): it keeps that one outcome, taken from the queue and
-- logged ISSUED (ranked after the floor and seq, in the lane's log stream), instead of being
-- decided again as the holder's DUPLICATE. An entry scored later is a new request and stays.
--
-- Runs behind reconcile_prelude.lua (the identity check, read_stock, take_stock). All checks run
-- before the first write. Running it twice is harmless: the second run finds the users in the
-- set and seq at the floor.
--
-- Returns { missing, taken from stock, unexplained, stock after (-1: no stock key), seq raised
-- to (-1: not raised), why the coupon was left alone ('' when it was not), issuing requests
-- taken from the queue and logged ISSUED }.
local queue_key, log_key, log_rows_key = KEYS[6], KEYS[7], KEYS[8]
local stock_raw, unusable = read_stock({ { stock_key, 'string' }, { issued_key, 'set' },
  { result_key, 'hash' }, { seq_key, 'string' }, { queue_key, 'zset' }, { log_key, 'stream' },
  { log_rows_key, 'string' } })
if unusable then return { 0, 0, 0, -1, -1, unusable, 0 } end
local seq_raw = redis.call('GET', seq_key)
if seq_raw and not is_count(seq_raw) then
  return { 0, 0, 0, -1, -1, 'seq is not a non-negative integer', 0 }
end

local coupon = ARGV[5]
local users, issued_at = {}, {}
for i = 6, #ARGV, 2 do
  users[#users + 1] = ARGV[i]
  issued_at[ARGV[i]] = tonumber(ARGV[i + 1])
end
local missing = {}
if #users > 0 then
  local held = redis.call('SMISMEMBER', issued_key, unpack(users))
  for i, h in ipairs(held) do
    if h == 0 then missing[#missing + 1] = users[i] end
  end
end
-- The missing holders' issuing requests still queued.
local issuing = {}
if #missing > 0 then
  local members = {}
  for i, user in ipairs(missing) do members[i] = user .. ':' .. coupon end
  local scores = redis.call('ZMSCORE', queue_key, unpack(members))
  for i, user in ipairs(missing) do
    local score = scores[i] and tonumber(scores[i])
    if score and score <= issued_at[user] then issuing[#issuing + 1] = members[i] end
  end
end
local stock, taken, unexplained = take_stock(stock_raw, #missing)
local seq = tonumber(seq_raw or '0')
local base = math.max(tonumber(ARGV[3]), seq)
local raised = -1
if base + #issuing > seq then raised = base + #issuing end

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
  if #issuing > 0 then
    redis.call('ZREM', queue_key, unpack(issuing))
    local ranks = {}
    for i = 1, #issuing do ranks[i] = string.format('%.0f', base + i) end
    -- One log entry, as decide.lua writes a batch's rows.
    redis.call('XADD', log_key, '*', 'm', table.concat(issuing, ' '), 'r', table.concat(ranks, ' '),
      'o', string.rep('I', #issuing))
    redis.call('INCRBY', log_rows_key, #issuing)
  end
  if raised >= 0 then redis.call('SET', seq_key, string.format('%.0f', raised)) end
end
return { #missing, taken, unexplained, stock, raised, '', #issuing }
