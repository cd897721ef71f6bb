#!lua
-- Walks a dead-letter stream in chunks and requeues, purges or only lists the entries that match
-- a filter (`requeue-dead`, `purge-dead`, their dry runs).
-- KEYS[1] dead-letter STREAM, KEYS[2] queue ZSET.
-- ARGV[1] exclusive start id ('-' for the beginning), ARGV[2] how many entries to look at,
-- ARGV[3] action: 'requeue', 'purge' or 'list' (a dry run: nothing is written),
-- ARGV[4] couponId the member must name ('' = any), ARGV[5] text the reason must contain
-- ('' = any), ARGV[6] the last id to look at, inclusive: the stream's last entry when the command
-- started, so entries a running drain dead-letters again meanwhile are not walked again (they
-- would be requeued over and over while their cause is still there).
-- requeue: an entry whose member or score is missing or not a number is left in the stream (an
-- operator must look at it); ZADD NX: if the user's request is already queued again, the queued
-- one keeps its place. purge: every matching entry is deleted.
-- Each call is atomic: an entry is never both queued and dead-lettered, nor neither. Sent twice
-- (a reply lost in a reconnect), the second call finds the entries already moved or deleted and
-- does nothing to them; ZADD NX and XDEL are harmless when repeated.
-- Returns { entries looked at, last id seen, matched entries as flat
-- [id, member, score, reason, done ('1' = moved/deleted, '0' = left)] }.

local start = ARGV[1]
if start ~= '-' then start = '(' .. start end
local action, coupon, wanted = ARGV[3], ARGV[4], ARGV[5]
local entries = redis.call('XRANGE', KEYS[1], start, ARGV[6], 'COUNT', tonumber(ARGV[2]))
local last, matched = ARGV[1], {}
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  local member, score, reason = '', '', ''
  for i = 1, #fields, 2 do
    if fields[i] == 'member' then member = fields[i + 1]
    elseif fields[i] == 'score' then score = fields[i + 1]
    elseif fields[i] == 'reason' then reason = fields[i + 1] end
  end
  last = id
  local matches = (coupon == '' or string.match(member, ':(%d+)$') == coupon)
    and (wanted == '' or string.find(reason, wanted, 1, true) ~= nil)
  if matches then
    local done = '0'
    if action == 'purge' then
      redis.call('XDEL', KEYS[1], id)
      done = '1'
    elseif action == 'requeue' and member ~= '' and tonumber(score) ~= nil then
      redis.call('ZADD', KEYS[2], 'NX', score, member)
      redis.call('XDEL', KEYS[1], id)
      done = '1'
    end
    for _, v in ipairs({ id, member, score, reason, done }) do table.insert(matched, v) end
  end
end
return { #entries, last, matched }
