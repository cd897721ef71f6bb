#!lua
-- Swaps a rebuild's result in as the ranking and records which rebuild the live ranking came from,
-- in one atomic step. Readers see the old ranking or the new one, never a missing or half-built one.
--
-- KEYS[1] the rebuild's temporary key (absent when the window was empty), KEYS[2] the ranking,
-- KEYS[3] where the old ranking is moved before it is UNLINKed (freed off the main thread),
-- KEYS[4] the live record (HASH: token, day, built_at). All four share the ranking key's slot.
-- ARGV[1] the rebuild's token, ARGV[2] its day (YYYY-MM-DD: strings compare as dates),
-- ARGV[3] '1' when the temporary key must exist (the window was not empty),
-- ARGV[4] '1' to refuse replacing a ranking built for a later day (scheduled runs), '0' to allow
-- it (an operator's `rebuild-ranking --date` in the past).
--
-- Safe to run twice (a client resends a command whose reply was lost): a second run finds its
-- own token in the live record and only reports, instead of moving the fresh ranking aside as if
-- it were the old one.
--
-- Returns { status, products in the ranking, day of the live ranking }, status one of
-- 'swapped', 'already' (this token is already live), 'later_day_live', 'temporary_key_gone'.

local live = redis.call('HMGET', KEYS[4], 'token', 'day')
if live[1] == ARGV[1] then
  return { 'already', redis.call('ZCARD', KEYS[2]), live[2] }
end
if ARGV[4] == '1' and live[2] and live[2] > ARGV[2] then
  return { 'later_day_live', redis.call('ZCARD', KEYS[2]), live[2] }
end
local has_temp = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[3] == '1' and not has_temp then
  -- Expired, or swapped in by an earlier run whose record another rebuild has since replaced:
  -- either way this rebuild's result is gone, and the live ranking must stay.
  return { 'temporary_key_gone', redis.call('ZCARD', KEYS[2]), live[2] or '' }
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('UNLINK', KEYS[3])
end
if has_temp then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[4], 'token', ARGV[1], 'day', ARGV[2], 'built_at', now[1])
return { 'swapped', redis.call('ZCARD', KEYS[2]), ARGV[2] }
