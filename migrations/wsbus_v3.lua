#!lua name=wsbus_v3
--[[
wsbus Redis functions, version 3: history (--history N). Loaded beside wsbus_v1 and wsbus_v2.

Every stream of history (a user's, a room's) is two keys in the slot of its target:
  P:{u:<uid>}:history / P:{r:<room>}:history   stream; entry id "<offset>-0", field "frame"
                                                (the frame exactly as clients get it)
  P:{u:<uid>}:hmeta   / P:{r:<room>}:hmeta     hash: epoch, top (the last offset given)
Both expire together --history-ttl after the last write (or the user's last connect or
disconnect). The epoch is made by the caller (random, with its creation time); a new one is
set whenever the meta is created, i.e. whenever the stream's past is gone (expired, or Redis
restarted empty), and the stream is deleted with it so offsets can start again at 1.
]]

-- The meta's epoch, creating the meta (and emptying the stream) with `new_epoch` if missing.
-- Returns epoch, created (0/1).
local function ensure_meta(stream, meta, new_epoch)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then
    return epoch, 0
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', new_epoch, 'top', 0)
  return new_epoch, 1
end

-- Appends one frame: `prefix` is the frame without its closing brace; the stored frame is
-- prefix .. ,"offset":N,"epoch":"E"} (the caller builds the same text).
local function append(stream, meta, maxlen, ttl, epoch, prefix)
  local top = redis.call('HINCRBY', meta, 'top', 1)
  local frame = prefix .. ',"offset":' .. top .. ',"epoch":"' .. epoch .. '"}'
  redis.call('XADD', stream, 'MAXLEN', maxlen, top .. '-0', 'frame', frame)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, ttl)
  return top
end

-- KEYS = P:{u:<uid>}:history, P:{u:<uid>}:hmeta, P:{u:<uid>}:sessions
-- ARGV = maxlen, ttl ms, new epoch, frame prefix.
-- A user with neither a live stream nor a session gets nothing stored: {0}.
-- Otherwise {offset, epoch, session field...} (fields "<node>:<sid>", where to deliver).
local function history_user(keys, args)
  if redis.call('EXISTS', keys[2]) == 0 and redis.call('EXISTS', keys[3]) == 0 then
    return {0}
  end
  local epoch = ensure_meta(keys[1], keys[2], args[3])
  local top = append(keys[1], keys[2], args[1], args[2], epoch, args[4])
  local reply = {top, epoch}
  for _, field in ipairs(redis.call('HKEYS', keys[3])) do
    reply[#reply + 1] = field
  end
  return reply
end

-- KEYS = P:{r:<room>}:history, P:{r:<room>}:hmeta, P:{r:<room>}:nodes
-- ARGV = maxlen, ttl ms, new epoch, frame prefix.  Reply {offset, epoch, node...}.
local function history_room(keys, args)
  local epoch = ensure_meta(keys[1], keys[2], args[3])
  local top = append(keys[1], keys[2], args[1], args[2], epoch, args[4])
  local reply = {top, epoch}
  for _, node in ipairs(redis.call('SMEMBERS', keys[3])) do
    reply[#reply + 1] = node
  end
  return reply
end

-- KEYS = stream, meta.  ARGV = ttl ms, new epoch, since (-1: read nothing), limit,
-- create (1: create a missing meta; 0: report it missing).
-- Refreshes the TTL (the target is alive). Reply:
-- {epoch or '', top, created, first kept offset (0: none), offset, frame, offset, frame...}
-- with the frames after `since` (at most `limit`).
local function history_open(keys, args)
  local stream, meta = keys[1], keys[2]
  local ttl = args[1]
  local epoch, created
  if args[5] == '1' then
    epoch, created = ensure_meta(stream, meta, args[2])
  else
    epoch = redis.call('HGET', meta, 'epoch')
    if not epoch then
      return {'', 0, 0, 0}
    end
    created = 0
  end
  local top = tonumber(redis.call('HGET', meta, 'top')) or 0
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  local first = 0
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if head[1] then
    first = tonumber(string.match(head[1][1], '^(%d+)'))
  end
  local reply = {epoch, top, created, first}
  local since = tonumber(args[3])
  local limit = tonumber(args[4])
  if since >= 0 and limit > 0 and since < top then
    for _, entry in ipairs(redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', limit)) do
      reply[#reply + 1] = tonumber(string.match(entry[1], '^(%d+)'))
      reply[#reply + 1] = entry[2][2]
    end
  end
  return reply
end

redis.register_function('wsbus_v3_history_user', history_user)
redis.register_function('wsbus_v3_history_room', history_room)
redis.register_function('wsbus_v3_history_open', history_open)
