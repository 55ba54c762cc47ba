-- Take the next pending recipient and mark it claimed in one step, so exactly one
-- instance dials it.
-- KEYS[1]: the batch's pending list. KEYS[2]: its state hash. ARGV[1]: the claimed state (JSON).
-- Returns the recipient's index, or nil when none is pending.
local index = redis.call('LPOP', KEYS[1])
if not index then return nil end
redis.call('HSET', KEYS[2], index, ARGV[1])
return index
