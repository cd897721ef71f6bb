#!lua
-- Moves dead-lettered entries back into the queue with their original score.
-- KEYS[1] dead-letter STREAM, KEYS[2] queue ZSET. ARGV[1] exclusive start id ('-' for the
-- beginning), ARGV[2] how many entries to look at.
-- An entry whose member or score is missing or not a number is left in the stream (an operator
-- must look at it); the returned cursor moves past it so the next call goes on.
-- ZADD NX: if the user's request is already queued again, the queued one keeps its place.
-- Returns { entries looked at, entries moved, last id seen }.

local start = ARGV[1]
if start ~= '-' then start = '(' .. start end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]))
local moved, last = 0, ARGV[1]
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  local member, score
  for i = 1, #fields, 2 do
    if fields[i] == 'member' then member = fields[i + 1]
    elseif fields[i] == 'score' then score = fields[i + 1] end
  end
  last = id
  if member ~= nil and score ~= nil and tonumber(score) ~= nil then
    redis.call('ZADD', KEYS[2], 'NX', score, member)
    redis.call('XDEL', KEYS[1], id)
    moved = moved + 1
  end
end
return { #entries, moved, last }
