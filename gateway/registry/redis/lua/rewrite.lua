-- Rewrite a record this instance owns, keeping its TTL, only while it is still ours (it carries
-- our session_hash): a stream moved to another instance must keep that one's record.
-- KEYS[1] the call's key; ARGV[1] the record (JSON), ARGV[2] its session_hash
-- Returns 1 when written, 0 when the record is gone, -1 when another instance owns the call.
local current = redis.call('GET', KEYS[1])
if not current then
  return 0
end
local ok, record = pcall(cjson.decode, current)
if ok and type(record) == 'table' and record['session_hash'] ~= ARGV[2] then
  return -1
end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
return 1
