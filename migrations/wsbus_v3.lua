#!lua name=wsbus_v3
--[[
wsbus Redis functions, version 3: history (--history N). Loaded beside wsbus_v1 and wsbus_v2.

Every stream of history (a user's, a room's) is two keys in the slot of its target:
  P:{u:<uid>}:history / P:{r:<room>}:history   stream; entry id "0-<offset>", field "frame"
                                                (the frame as clients get it, but for its
                                                "offset" and "epoch", which nodes add)
  P:{u:<uid>}:hmeta   / P:{r:<room>}:hmeta     hash: epoch
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
  redis.call('HSET', meta, 'epoch', new_epoch)
  return new_epoch, 1
end

-- The offset of a stream entry id "0-<offset>".
local function offset_of(id)
  return tonumber(string.match(id, '%-(%d+)$'))
end

-- KEYS = the stream, its meta, where its target is (P:{u:<uid>}:sessions, or
-- P:{r:<room>}:nodes).
-- ARGV = trim ('=' exact, '~' approximate), maxlen, ttl ms, new epoch, kind ('u'|'r'),
-- then the frames to append, in order (each without offset and epoch).
-- Entry ids are "0-<offset>": Redis numbers them 1, 2, 3... and keeps counting across trims.
-- A user with neither a live stream nor a session gets nothing stored: {0}.
-- Otherwise {offset of the first frame, epoch, where...} (session fields "<node>:<sid>" of
-- a user, nodes with members of a room).
local function history_append(keys, args)
  local stream, meta = keys[1], keys[2]
  local user = args[5] == 'u'
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    if user and redis.call('EXISTS', keys[3]) == 0 then
      return {0}
    end
    epoch = ensure_meta(stream, meta, args[4])
  end
  local first
  for i = 6, #args do
    local id = redis.call('XADD', stream, 'MAXLEN', args[1], args[2], '0-*', 'frame', args[i])
    first = first or offset_of(id)
  end
  redis.call('PEXPIRE', stream, args[3])
  redis.call('PEXPIRE', meta, args[3])
  local reply = {first, epoch}
  local where
  if user then
    where = redis.call('HKEYS', keys[3])
  else
    where = redis.call('SMEMBERS', keys[3])
  end
  for _, w in ipairs(where) do
    reply[#reply + 1] = w
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
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  local top, first = 0, 0
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if last[1] then
    top = offset_of(last[1][1])
    first = offset_of(redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1])
  end
  local reply = {epoch, top, created, first}
  local since = tonumber(args[3])
  local limit = tonumber(args[4])
  if since >= 0 and limit > 0 and since < top then
    for _, entry in ipairs(redis.call('XRANGE', stream, '0-' .. (since + 1), '+', 'COUNT', limit)) do
      reply[#reply + 1] = offset_of(entry[1])
      reply[#reply + 1] = entry[2][2]
    end
  end
  return reply
end

redis.register_function('wsbus_v3_history_append', history_append)
redis.register_function('wsbus_v3_history_open', history_open)
