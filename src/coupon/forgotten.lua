-- Puts back one chunk of the decisions a rolled-back Redis forgot (README "When Redis forgets",
-- docs/contract.md §2): the coupon's ranking_logs rows with a rank above the seq Redis came back
-- with were decided after the state Redis restarted from.
--
-- KEYS[1] marker, KEYS[2] stock STRING, KEYS[3] issued SET, KEYS[4] result HASH, KEYS[5] seq,
-- KEYS[6] the lane's queue ZSET, KEYS[7] the lane's outbox ZSET.
-- ARGV[1] the identity being reconciled, ARGV[2] '1' for a dry run (nothing written), ARGV[3]
-- the seq the rows were selected against ('0' when there was none), ARGV[4] stock a dry run's
-- earlier chunks would have taken (0 otherwise), then 5 per row, in rank order: userId, member
-- ("userId:couponId"), decision time in epoch ms, outcome (ISSUED, DUPLICATE, SOLD_OUT,
-- UNKNOWN_COUPON; '' for a row whose outcome is unknown: its result is left alone), '1' if user_coupon holds (userId, coupon) else '0'. At most a few thousand
-- rows (unpack() spreads them onto Lua's stack).
--
-- Per row:
-- * the queue's entry for the member, if its score (the API's enqueue time) is not after the
--   decision time, is that same request put back by the rollback: it is removed. An entry scored
--   after the decision is a new request by the same user and stays (to be decided);
-- * unless a new request stays queued, the result hash gets the row's outcome back — never over
--   ISSUED;
-- * an ISSUED row the user_coupon table lacks (its outbox entry was rolled back before it was
--   persisted) is honoured: the user joins the issued set with ISSUED, the stock is decremented
--   (never below 0: what it cannot explain is counted and returned, the holder is still added,
--   as reconcile.lua does) and the member goes back in the outbox, scored with the decision
--   time, for the persister to write to user_coupon.
--
-- Runs behind reconcile_prelude.lua (the identity check, read_stock, take_stock), which refuses
-- with REDIS_CHANGED (and writes nothing) when this is not the Redis being reconciled. Writes
-- nothing either, returning why, when seq is no longer ARGV[3]: another replica finished
-- this reconciliation (it raises seq last) and requests may have been decided since. Every check
-- runs before the first write. Running it twice is harmless: the second run finds the entries
-- gone from the queue, the holders in the set and the results in place.
--
-- Returns { rows, queue entries removed, results restored, ISSUED rows honoured, taken from
-- stock, unexplained, stock after (-1: no stock key), why the chunk was skipped ('' if not) }.
local queue_key, outbox_key = KEYS[6], KEYS[7]

local function skipped(why)
  return { 0, 0, 0, 0, 0, 0, -1, why }
end
local stock_raw, unusable = read_stock({ { stock_key, 'string' }, { issued_key, 'set' },
  { result_key, 'hash' }, { seq_key, 'string' }, { queue_key, 'zset' }, { outbox_key, 'zset' } })
if unusable then return skipped(unusable) end
if (redis.call('GET', seq_key) or '0') ~= ARGV[3] then
  return skipped('seq moved: reconciled by another replica meanwhile')
end

local users, members, decided, outcomes, persisted = {}, {}, {}, {}, {}
for i = 5, #ARGV, 5 do
  users[#users + 1] = ARGV[i]
  members[#members + 1] = ARGV[i + 1]
  decided[#decided + 1] = tonumber(ARGV[i + 2])
  outcomes[#outcomes + 1] = ARGV[i + 3]
  persisted[#persisted + 1] = ARGV[i + 4] == '1'
end
local n = #users
if n == 0 then return { 0, 0, 0, 0, 0, 0, -1, '' } end
local scores = redis.call('ZMSCORE', queue_key, unpack(members))
local held = redis.call('SMISMEMBER', issued_key, unpack(users))
local current = redis.call('HMGET', result_key, unpack(users))

-- Decide every row against what was read (rows of one user may repeat: the last one wins).
local removed, removed_list = {}, {}
local result_of, result_order = {}, {}
local holder, new_holders, outbox_adds = {}, {}, {}
for i = 1, n do
  local user, member = users[i], members[i]
  local score = scores[i] and tonumber(scores[i])
  if score and score <= decided[i] and not removed[member] then
    removed[member] = true
    removed_list[#removed_list + 1] = member
  end
  if held[i] == 1 then holder[user] = true end
  local waiting = score ~= nil and not removed[member]
  if outcomes[i] == 'ISSUED' then
    if not holder[user] and not persisted[i] then
      holder[user] = true
      new_holders[#new_holders + 1] = user
      outbox_adds[#outbox_adds + 1] = string.format('%.0f', decided[i])
      outbox_adds[#outbox_adds + 1] = member
      if result_of[user] == nil then result_order[#result_order + 1] = user end
      result_of[user] = 'ISSUED'
    end
  elseif outcomes[i] ~= '' and not waiting and not holder[user] and current[i] ~= 'ISSUED'
      and result_of[user] ~= 'ISSUED' and current[i] ~= outcomes[i] then
    if result_of[user] == nil then result_order[#result_order + 1] = user end
    result_of[user] = outcomes[i]
  end
end

local stock, taken, unexplained = take_stock(stock_raw, #new_holders)

if not dry then
  if #removed_list > 0 then redis.call('ZREM', queue_key, unpack(removed_list)) end
  if #new_holders > 0 then
    redis.call('SADD', issued_key, unpack(new_holders))
    redis.call('ZADD', outbox_key, 'NX', unpack(outbox_adds))
  end
  if #result_order > 0 then
    local results = {}
    for _, user in ipairs(result_order) do
      results[#results + 1] = user
      results[#results + 1] = result_of[user]
    end
    redis.call('HSET', result_key, unpack(results))
  end
  if taken > 0 then redis.call('DECRBY', stock_key, taken) end
end
return { n, #removed_list, #result_order, #new_holders, taken, unexplained, stock, '' }
