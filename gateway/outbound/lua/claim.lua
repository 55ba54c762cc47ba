-- Take the next pending recipient and mark it claimed in one step, so exactly one
-- instance dials it; note the claim's time, so that the sweep reads only stale claims.
-- KEYS[1]: the batch's pending list. KEYS[2]: its state hash. KEYS[3]: its claims (sorted set).
-- ARGV[1]: the claimed state (JSON). ARGV[2]: the claim's time (s). ARGV[3]: the keys' TTL (s).
-- Returns the recipient's index, or nil when none is pending.
local index = redis.call('LPOP', KEYS[1])
if not index then return nil end
redis.call('HSET', KEYS[2], index, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], index)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return index
