#!lua
-- One step of the chunked strategy: sums a chunk of one daily key's members over the whole window
-- and adds them to the rebuild's result, a sorted set written directly (the swap is a RENAME).
-- Each call blocks Redis for a few milliseconds; the worker never holds more than a chunk.
--
-- The window's daily keys are walked one after the other, in the order the worker chose. A member
-- is summed once, by the first daily key (in that order) that holds it: its score there times
-- its weight, plus its weighted scores in the daily keys walked after it (ZMSCORE, a lookup per
-- later key). The daily keys walked before it cannot hold it, or it would already be in the
-- result: ZADD NX leaves such a member alone, and a middle key first drops the members the
-- result already holds (ZMSCORE), so it looks up only the members new to the result.
--
-- KEYS[1] the result (ZSET), KEYS[2] the rebuild's ledger (HASH step -> reply), then, except in
-- mode 'given', KEYS[3] the daily key walked and KEYS[4..] the daily keys walked after it (all in
-- the result's slot).
-- ARGV[1] the step (unique within the build), ARGV[2] the TTL of KEYS[1] and KEYS[2] in seconds,
-- ARGV[3] the mode, ARGV[4] '1' to drop the members the result already holds before the lookups,
-- ARGV[5] the walked key's weight, ARGV[6] n, the number of later keys, ARGV[7 .. 6+n] their
-- weights, then from ARGV[7+n]:
--   mode 'rank':  start, stop: a rank range of KEYS[3] (a day nobody writes any more);
--   mode 'after': anchor member, anchor score, count: the next count members of KEYS[3] (a day
--                 that may still be written) after the last one the previous call read (the
--                 anchor; '' for the first call). Sales only raise scores, so a member not read
--                 yet stays ahead of the anchor however the ranks shift; when the anchor itself
--                 moved, the walk resumes at the first member scoring as much as it did (members
--                 read again are left alone by ZADD NX);
--   mode 'given': score, member, score, member, ...: sums the worker computed itself (its daily
--                 keys live in other cluster slots), added as they are.
--
-- Safe to run twice (a client resends a call whose reply was lost): a step found in the ledger
-- returns its first reply and writes nothing. The ledger and the result expire with ARGV[2]: a
-- crashed rebuild leaves nothing behind for long.
--
-- Returns { members added to the result, entries read, microseconds this call took (0 for a
-- replay), the last member read and its score (mode 'after': the next call's anchor) }.

local done = redis.call('HGET', KEYS[2], ARGV[1])
if done then
  local reply = cmsgpack.unpack(done)
  reply[3] = 0
  return reply
end
local t0 = redis.call('TIME')

-- unpack() spreads at most ~8000 values: every command below takes at most SLICE members.
local SLICE = 3000
local mode = ARGV[3]
local weight = tonumber(ARGV[5])
local later = tonumber(ARGV[6])
local first_arg = 7 + later

local members, scores = {}, {}
local last_member, last_score = '', ''
if mode == 'given' then
  for i = first_arg, #ARGV, 2 do
    scores[#scores + 1] = ARGV[i]
    members[#members + 1] = ARGV[i + 1]
  end
  weight = 1
else
  local start, stop
  if mode == 'rank' then
    start, stop = tonumber(ARGV[first_arg]), tonumber(ARGV[first_arg + 1])
  else
    local anchor, anchor_score = ARGV[first_arg], ARGV[first_arg + 1]
    start = 0
    if anchor ~= '' then
      local now = redis.call('ZSCORE', KEYS[3], anchor)
      if now and tonumber(now) == tonumber(anchor_score) then
        start = redis.call('ZRANK', KEYS[3], anchor) + 1
      else
        start = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. anchor_score)
      end
    end
    stop = start + tonumber(ARGV[first_arg + 2]) - 1
  end
  local entries = redis.call('ZRANGE', KEYS[3], start, stop, 'WITHSCORES')
  for i = 1, #entries, 2 do
    members[#members + 1] = entries[i]
    scores[#scores + 1] = entries[i + 1]
  end
  if #entries > 0 then
    last_member, last_score = entries[#entries - 1], entries[#entries]
  end
end
local read = #members

if ARGV[4] == '1' and read > 0 then
  local kept_members, kept_scores = {}, {}
  for from = 1, read, SLICE do
    local to = math.min(from + SLICE - 1, read)
    local present = redis.call('ZMSCORE', KEYS[1], unpack(members, from, to))
    for j = from, to do
      if not present[j - from + 1] then
        kept_members[#kept_members + 1] = members[j]
        kept_scores[#kept_scores + 1] = scores[j]
      end
    end
  end
  members, scores = kept_members, kept_scores
end

local count = #members
-- sums[j]: the member's sum when it differs from its score string as read (else nil).
local sums = {}
if weight ~= 1 then
  for j = 1, count do sums[j] = weight * tonumber(scores[j]) end
end
for k = 1, later do
  local w = tonumber(ARGV[6 + k])
  for from = 1, count, SLICE do
    local to = math.min(from + SLICE - 1, count)
    local found = redis.call('ZMSCORE', KEYS[3 + k], unpack(members, from, to))
    for j = from, to do
      local score = found[j - from + 1]
      if score then
        sums[j] = (sums[j] or tonumber(scores[j])) + w * tonumber(score)
      end
    end
  end
end

local added = 0
if count > 0 then
  local args = {}
  for j = 1, count do
    local sum = sums[j]
    if sum == nil then
      args[2 * j - 1] = scores[j]
    elseif sum == math.floor(sum) and sum > -1e15 and sum < 1e15 then
      args[2 * j - 1] = string.format('%d', sum) -- exact, and much cheaper than %.17g
    else
      args[2 * j - 1] = string.format('%.17g', sum)
    end
    args[2 * j] = members[j]
  end
  for from = 1, #args, 2 * SLICE do
    added = added + redis.call('ZADD', KEYS[1], 'NX', unpack(args, from, math.min(from + 2 * SLICE - 1, #args)))
  end
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
local t1 = redis.call('TIME')
local reply = { added, read, (t1[1] - t0[1]) * 1000000 + (t1[2] - t0[2]), last_member, last_score }
redis.call('HSET', KEYS[2], ARGV[1], cmsgpack.pack(reply))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return reply
