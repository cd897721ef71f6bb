#!lua
-- Adds one chunk of a daily key, times its weight, into a rebuild's running sum: one step of the
-- chunked strategy, which sums the window inside Redis a chunk at a time so no single call blocks
-- Redis for long and the worker never holds more than one chunk. The running sum is a HASH
-- (member -> sum): updating a hash field is a table lookup, where updating a sorted set would also
-- move the member in its skiplist; the sorted set is written once, at the end.
--
-- KEYS[1] the running sum, KEYS[2] the rebuild's progress bitmap (same slot), and, when the chunk
-- is read here, KEYS[3] the source key (a daily key in the same slot, or a snapshot of one).
-- ARGV[1] the step number (unique within the rebuild), ARGV[2] the weight,
-- ARGV[3] the keys' TTL in seconds, then either
--   ARGV[4], ARGV[5]: the source's rank range start, stop (read with ZRANGE from KEYS[3]), or
--   ARGV[4..]: member, score, member, score, ... (read by the worker from another slot).
--
-- Safe to run twice: a step whose bit is set in the progress bitmap is not added again (a client
-- resends a call whose reply was lost), whatever order steps arrive in (several travel at once).
-- Returns the number of source entries in the chunk (so the caller knows when a source ends).

local step = tonumber(ARGV[1])
local weight = tonumber(ARGV[2])
local entries = ARGV
local first = 4
if KEYS[3] then
  entries = redis.call('ZRANGE', KEYS[3], ARGV[4], ARGV[5], 'WITHSCORES')
  first = 1
end
local n = (#entries - first + 1) / 2
if n == 0 then return 0 end
if redis.call('GETBIT', KEYS[2], step) == 1 then return n end

local members = {}
for i = first, #entries, 2 do members[#members + 1] = entries[i] end
local current = redis.call('HMGET', KEYS[1], unpack(members))
local args = {}
local j = 0
for i = first, #entries, 2 do
  j = j + 1
  local score = entries[i + 1]
  if current[j] then
    score = string.format('%.17g', tonumber(current[j]) + weight * tonumber(score))
  elseif weight ~= 1 then
    score = string.format('%.17g', weight * tonumber(score))
  end
  args[#args + 1] = entries[i]
  args[#args + 1] = score
end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('SETBIT', KEYS[2], step, 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return n
