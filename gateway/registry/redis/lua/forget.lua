-- Delete a call's record if it still carries this control token, and the token's own key in
-- any case: an instance whose stream was handed over must not delete the new owner's record.
-- KEYS[1] the call's key, KEYS[2] the token's key; ARGV[1] the token_hash
-- Returns 1 when the record was deleted (or was gone), 0 when it is another's now.
redis.call('DEL', KEYS[2])
local current = redis.call('GET', KEYS[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and record['token_hash'] ~= ARGV[1] then
    return 0
  end
  redis.call('DEL', KEYS[1])
end
return 1
