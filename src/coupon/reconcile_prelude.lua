-- What reconcile.lua and forgotten.lua share: reconcile.rs puts this in front of each of them
-- when it loads them (Lua scripts cannot import). Both take KEYS[2] stock STRING, KEYS[3] issued
-- SET, KEYS[4] result HASH, KEYS[5] seq, ARGV[1] the identity being reconciled, ARGV[2] '1' for
-- a dry run, ARGV[4] stock a dry run's earlier chunks would have taken (0 otherwise).
--
-- Runs behind identity.lua. First of all, either script refuses with REDIS_CHANGED (and writes
-- nothing) when this is not the Redis being reconciled.
if identity ~= ARGV[1] then
  return redis.error_reply('REDIS_CHANGED Redis is now ' .. identity .. ', reconciling ' .. ARGV[1])
end
local stock_key, issued_key, result_key, seq_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dry = ARGV[2] == '1'

-- Whether s is a count as decide.lua reads one: a non-negative integer of at most 18 digits.
local function is_count(s)
  return s == '0' or (string.match(s, '^[1-9]%d*$') ~= nil and #s <= 18)
end

-- The coupon's stock (false: no stock key) and, when the decide script cannot use the coupon's
-- keys either, why: a key of `specs` ({ key, type } each) holding another type, or a stock that
-- is not a count. Such a coupon is not touched: its requests are dead-lettered, and
-- reconciliation reports it.
local function read_stock(specs)
  for _, spec in ipairs(specs) do
    local t = redis.call('TYPE', spec[1])['ok']
    if t ~= 'none' and t ~= spec[2] then
      return false, spec[1] .. ' is a ' .. t .. ', expected a ' .. spec[2]
    end
  end
  local raw = redis.call('GET', stock_key)
  if raw and not is_count(raw) then
    return false, 'stock is not a non-negative integer'
  end
  return raw, nil
end

-- The stock `wanted` new holders take from `stock_raw`, after what a dry run's earlier chunks
-- would have taken (ARGV[4]): never below 0 — what the stock cannot explain is counted, and the
-- holders are still added (MySQL is the system of record). Returns stock after (-1: no stock
-- key), taken, unexplained.
local function take_stock(stock_raw, wanted)
  if not stock_raw then return -1, 0, wanted end
  local stock = math.max(0, tonumber(stock_raw) - tonumber(ARGV[4]))
  local taken = math.min(wanted, stock)
  return stock - taken, taken, wanted - taken
end

