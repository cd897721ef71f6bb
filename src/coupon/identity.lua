-- The identity of the Redis a script runs on: its run_id, new on every restart, restore and
-- failover, and its replication id. Every script that compares identities starts with this
-- (Lua scripts cannot import: the Rust code that loads a script puts this file in front of it),
-- so they all compute it the same way: marker.lua, outbox_read.lua, reconcile_prelude.lua, and
-- the ranking log's hold script (its writer checks the lane's redis_fence against it).
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local identity = (run_id or '?') .. ':' .. (replid or '?')

