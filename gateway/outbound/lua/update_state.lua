-- Merge fields into a recipient's state if its current status is one of those allowed.
-- KEYS[1]: the batch's state hash. ARGV[1]: the recipient's index. ARGV[2]: the fields (JSON).
-- ARGV[3..]: the statuses it may move from.
-- Returns 1 if updated, 0 otherwise.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local status = cjson.decode(current)['status']
for i = 3, #ARGV do
  if ARGV[i] == status then
    local merged = cjson.decode(current)
    for k, v in pairs(cjson.decode(ARGV[2])) do merged[k] = v end
    redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(merged))
    return 1
  end
end
return 0
