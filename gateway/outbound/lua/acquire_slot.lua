-- Take one of MAX_CONCURRENT_CALLS slots, first dropping slots older than their TTL
-- (their final callback was lost).
-- KEYS[1]: sorted set of slots, scored by when taken. ARGV: member, cap, TTL in s.
-- Returns 1 if the slot was taken, 0 if the cap is reached.
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
