-- Delete a call's record and its token's key, if the record still belongs to this session of
-- the call (its session_hash): an instance whose stream moved elsewhere must not delete the new
-- owner's record, nor the control token the call keeps across the move.
-- KEYS[1] the call's key; ARGV[1] the session_hash ('' deletes whatever is there),
-- ARGV[2] the prefix of token keys
-- Returns 1 when the record was deleted (or was gone), 0 when it is another session's now.
local current = redis.call('GET', KEYS[1])
if not current then
  return 1
end
local ok, record = pcall(cjson.decode, current)
if ok and type(record) == 'table' then
  if ARGV[1] ~= '' and record['session_hash'] ~= ARGV[1] then
    return 0
  end
  if type(record['token_hash']) == 'string' and record['token_hash'] ~= '' then
    redis.call('DEL', ARGV[2] .. record['token_hash'])
  end
end
redis.call('DEL', KEYS[1])
return 1
