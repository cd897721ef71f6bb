-- Reads the oldest outbox entries, with the identity of the Redis they were read from.
--
-- KEYS[1] outbox ZSET, KEYS[2] the lane's reconciliation marker. ARGV[1] how many entries.
-- Returns { identity, member, score, member, score, ... }, or UNRECONCILED (as decide.lua does)
-- when this Redis has not been reconciled from MySQL yet. The persister inserts the entries only
-- if MySQL's fence still names this identity (see outbox.rs), so a batch read from a Redis that
-- was since replaced never lands behind the back of the reconciliation. Runs behind identity.lua.
if redis.call('GET', KEYS[2]) ~= identity then
  return redis.error_reply('UNRECONCILED Redis ' .. identity .. ' has not been reconciled from MySQL')
end
local out = { identity }
local entries = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
for _, v in ipairs(entries) do out[#out + 1] = v end
return out
