-- The lane's reconciliation marker (README "When Redis forgets").
--
-- KEYS[1] marker STRING. ARGV[1] 'get' or 'set', ARGV[2] (for 'set') the identity reconciled.
-- Runs behind identity.lua (`identity`: this Redis' run_id and replication id; decide.lua
-- computes it the same way).
--
-- 'get' returns { live identity, marker or '' }.
-- 'set' writes the marker only if this Redis still is the one reconciled (else REDIS_CHANGED and
-- no write): reconciliation took a while, and a restart in the middle must not be marked done.
-- Running 'set' twice is harmless.
if ARGV[1] == 'set' then
  if identity ~= ARGV[2] then
    return redis.error_reply('REDIS_CHANGED Redis is now ' .. identity .. ', reconciled ' .. ARGV[2])
  end
  redis.call('SET', KEYS[1], identity)
  return { identity, identity }
end
return { identity, redis.call('GET', KEYS[1]) or '' }
