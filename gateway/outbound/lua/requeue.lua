-- Put a claimed-but-never-dialled recipient back at the front of the queue.
-- KEYS[1]: the batch's state hash. KEYS[2]: its pending list. KEYS[3]: its claims.
-- ARGV[1]: the recipient's index. ARGV[2]: the pending state (JSON).
-- Returns 1 if requeued, 0 if it was no longer claimed.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or cjson.decode(current)['status'] ~= 'claimed' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
