-- Take an Idempotency-Key over from an earlier request (which died, or made no call), only if
-- its value is still the one this request read: of two concurrent retries, one goes on.
-- KEYS[1]: the key. ARGV[1]: the value read. ARGV[2]: the new value. ARGV[3]: its TTL in s.
-- Returns 1 if taken over, 0 if another request got there first.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
