-- Sliding-window rate limit on the server's clock, so every instance counts the same window.
-- KEYS[1]: a sorted set of recent hits. ARGV: window (ms), limit, a unique member for this hit.
-- Returns 1 when the hit is within the limit, else 0. Keeps at most limit + 1 members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n > limit + 1 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - limit - 2)
  n = limit + 1
end
redis.call('PEXPIRE', KEYS[1], window)
if n <= limit then return 1 end
return 0
