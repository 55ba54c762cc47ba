-- Store a value under an Idempotency-Key unless a non-empty one is there already.
-- KEYS[1]: the key. ARGV[1]: the value. ARGV[2]: its TTL in s.
-- Returns the existing value, or false if this one was stored.
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= '' then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return false
