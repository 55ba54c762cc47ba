-- Reserve the next call start, CALLS_PER_SECOND across every instance.
-- KEYS[1]: the time (ms, Redis clock) of the next free start. ARGV[1]: the interval in ms.
-- Returns how many ms the caller waits before starting (0: now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, nxt)
redis.call('SET', KEYS[1], start + tonumber(ARGV[1]), 'PX', tonumber(ARGV[1]) + 60000)
return start - now
