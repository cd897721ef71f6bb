#!lua
-- Swaps a rebuild's result in as the ranking and records which rebuild the live ranking came from,
-- in one atomic step. Readers see the old ranking or the new one, never a missing or half-built one.
--
-- KEYS[1] the rebuild's temporary key (absent when the window was empty), KEYS[2] the ranking,
-- KEYS[3] where the old ranking is moved before it is UNLINKed (freed off the main thread),
-- KEYS[4] the live record (HASH: token, day, built_at). All four share the ranking key's slot.
-- ARGV[1] the rebuild's token, ARGV[2] its day (YYYY-MM-DD: strings compare as dates),
-- ARGV[3] the number of members the build put in the temporary key (0 for an empty window),
-- ARGV[4] for scheduled runs, the latest day that may be live (today): a ranking built for a later
-- day up to it is not replaced, one dated after it (a record from the future) is; '' (an
-- operator's `rebuild-ranking --date`) replaces any.
--
-- Safe to run twice (a client resends a command whose reply was lost): a second run finds its
-- own token in the live record and only reports, instead of moving the fresh ranking aside as if
-- it were the old one.
--
-- Returns { status, products in the ranking, day of the live ranking, detail }, status one of
-- 'swapped' (detail: the day of the ranking replaced, or ''), 'already' (this token is already
-- live), 'later_day_live', 'incomplete' (the temporary key does not hold ARGV[3] members — lost
-- in part or in whole, by a restart, a failover or an eviction: detail, the members it holds).

local live = redis.call('HMGET', KEYS[4], 'token', 'day')
if live[1] == ARGV[1] then
  return { 'already', redis.call('ZCARD', KEYS[2]), live[2], '' }
end
if ARGV[4] ~= '' and live[2] and live[2] > ARGV[2] and live[2] <= ARGV[4] then
  return { 'later_day_live', redis.call('ZCARD', KEYS[2]), live[2], '' }
end
local found = redis.call('ZCARD', KEYS[1])
if found ~= tonumber(ARGV[3]) then
  -- Expired, lost in part, or swapped in by an earlier run whose record another rebuild has since
  -- replaced: either way this rebuild's result is not whole, and the live ranking must stay.
  return { 'incomplete', redis.call('ZCARD', KEYS[2]), live[2] or '', tostring(found) }
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('UNLINK', KEYS[3])
end
if found > 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[4], 'token', ARGV[1], 'day', ARGV[2], 'built_at', now[1])
return { 'swapped', redis.call('ZCARD', KEYS[2]), ARGV[2], live[2] or '' }
