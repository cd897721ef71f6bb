#!lua
-- Copies one page of a scan into a key the rebuild owns, each score times a weight:
--   ARGV[5] = 'zset_to_hash': a ZSCAN page of a daily key into the running sum (the first source,
--     before anything else was added to it);
--   ARGV[5] = 'zset_to_zset': a ZSCAN page of a daily key that may still be written into a
--     snapshot, summed afterwards like a settled day;
--   ARGV[5] = 'hash_to_zset': an HSCAN page of the finished running sum into the temporary key.
-- SCAN may return an element twice (while a key changes or its table is resized); every write
-- here overwrites, so that is harmless, and so is running this twice.
--
-- KEYS[1] the destination, KEYS[2] the source, in the same slot. ARGV[1] the cursor, ARGV[2]
-- COUNT, ARGV[3] the weight, ARGV[4] the destination's TTL in seconds.
-- Returns the next cursor ('0' when the scan is complete).

local mode = ARGV[5]
local page
if mode == 'hash_to_zset' then
  page = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
else
  page = redis.call('ZSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
end
local entries = page[2]
local weight = tonumber(ARGV[3])
if #entries > 0 then
  -- Scores arrive as strings; with weight 1 (the usual case) they are written as they came.
  local args = entries
  if mode == 'zset_to_hash' then
    if weight ~= 1 then
      for i = 2, #entries, 2 do
        entries[i] = string.format('%.17g', weight * tonumber(entries[i]))
      end
    end
  else
    args = {}
    for i = 1, #entries, 2 do
      local score = entries[i + 1]
      if weight ~= 1 then score = string.format('%.17g', weight * tonumber(score)) end
      args[i] = score
      args[i + 1] = entries[i]
    end
  end
  -- A SCAN page can hold more than COUNT entries (a table that could not be resized during a
  -- fork has several per bucket): write in slices, as unpack() cannot spread more than ~8000.
  local command = mode == 'zset_to_hash' and 'HSET' or 'ZADD'
  for from = 1, #args, 2000 do
    redis.call(command, KEYS[1], unpack(args, from, math.min(from + 1999, #args)))
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return page[1]
