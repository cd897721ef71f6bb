-- The lane's reconciliation marker (README "When Redis forgets").
--
-- KEYS[1] marker STRING. ARGV[1] 'get' or 'set', ARGV[2] (for 'set') the identity reconciled.
-- The identity of a Redis is its run_id (new on every restart, restore, failover) and its
-- replication id; decide.lua computes it the same way.
--
-- 'get' returns { live identity, marker or '' }.
-- 'set' writes the marker only if this Redis still is the one reconciled (else REDIS_CHANGED and
-- no write): reconciliation took a while, and a restart in the middle must not be marked done.
-- Running 'set' twice is harmless.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local identity = (run_id or '?') .. ':' .. (replid or '?')
if ARGV[1] == 'set' then
  if identity ~= ARGV[2] then
    return redis.error_reply('REDIS_CHANGED Redis is now ' .. identity .. ', reconciled ' .. ARGV[2])
  end
  redis.call('SET', KEYS[1], identity)
  return { identity, identity }
end
return { identity, redis.call('GET', KEYS[1]) or '' }
