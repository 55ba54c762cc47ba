-- Restore a record this instance owns, unless another session of the call has taken it since
-- (the record there carries another session_hash): a stream moved to a new instance must keep
-- that instance's record.
-- KEYS[1] the call's key, KEYS[2] its token's key
-- ARGV[1] the record (JSON), ARGV[2] its session_hash, ARGV[3] the TTL in ms, ARGV[4] the call SID
-- Returns 1 when written, 0 when the call is another instance's now.
local current = redis.call('GET', KEYS[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and record['session_hash'] ~= ARGV[2] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
return 1
