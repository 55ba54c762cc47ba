-- Merge fields into a recipient's state if its current status is one of those allowed; keep
-- the batch's claims and its count of finished recipients in step, so that neither the sweep
-- nor the end of the batch has to read every recipient's state.
-- KEYS[1]: the batch's state hash. KEYS[2]: its claims. KEYS[3]: its finished count.
-- ARGV[1]: the recipient's index. ARGV[2]: the fields (JSON). ARGV[3]: the keys' TTL (s).
-- ARGV[4..]: the statuses it may move from.
-- Returns 1 if updated, 0 otherwise.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local status = cjson.decode(current)['status']
for i = 4, #ARGV do
  if ARGV[i] == status then
    local merged = cjson.decode(current)
    for k, v in pairs(cjson.decode(ARGV[2])) do merged[k] = v end
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(merged))
    if status == 'claimed' and merged['status'] ~= 'claimed' then
      redis.call('ZREM', KEYS[2], ARGV[1])
    end
    if merged['status'] == 'done' or merged['status'] == 'failed' then
      redis.call('INCR', KEYS[3])
      redis.call('EXPIRE', KEYS[3], ARGV[3])
    end
    return 1
  end
end
return 0
