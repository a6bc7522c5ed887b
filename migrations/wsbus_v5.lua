#!lua name=wsbus_v5
--[[
wsbus Redis functions, version 5: history streams bounded in bytes (--history-max-bytes), and
nothing stored for a target without a live stream. Loaded beside wsbus_v1..v4 (v3's
history_open is still the one that reads streams; its append is what nodes of the previous
version call).

Keys as in v3: P:{u:<uid>}:history / P:{r:<room>}:history (stream, entry "0-<offset>", field
"frame") and P:{u:<uid>}:hmeta / P:{r:<room>}:hmeta (hash: epoch, and now bytes: the frames'
bytes appended since the last trim, never less than what the stream holds: entries that
MAXLEN trimmed are still counted until the next byte trim recounts).
]]

-- The meta's epoch, creating the meta (and emptying the stream) with `new_epoch` if missing.
local function ensure_meta(stream, meta, new_epoch)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then
    return epoch
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', new_epoch)
  return new_epoch
end

-- The offset of a stream entry id "0-<offset>".
local function offset_of(id)
  return tonumber(string.match(id, '%-(%d+)$'))
end

-- Counts `added` bytes into the meta; past `max` bytes, trims the oldest entries until the
-- stream holds at most 7/8 of `max` (so a full stream is walked once per max/8 bytes
-- appended, not on every append), always keeping the newest entry, and records what is
-- left. Returns the bytes the stream holds (as counted).
local function account(stream, meta, added, max)
  local total = redis.call('HINCRBY', meta, 'bytes', added)
  if total <= max then
    return total
  end
  local entries = redis.call('XRANGE', stream, '-', '+')
  total = 0
  for _, entry in ipairs(entries) do
    total = total + #entry[2][2]
  end
  local target = math.floor(max * 7 / 8)
  local keep = 1
  while total > target and keep < #entries do
    total = total - #entries[keep][2][2]
    keep = keep + 1
  end
  if keep > 1 then
    redis.call('XTRIM', stream, 'MINID', '=', entries[keep][1])
  end
  redis.call('HSET', meta, 'bytes', total)
  return total
end

-- KEYS = the stream, its meta, where its target is (P:{u:<uid>}:sessions, or
-- P:{r:<room>}:nodes).
-- ARGV = trim ('=' exact, '~' approximate), maxlen, ttl ms, new epoch, kind ('u'|'r'),
-- max bytes, then the frames to append, in order (each without offset and epoch).
-- A target with neither a live stream nor sessions (a user) or members (a room) gets nothing
-- stored and no key made: {0}. Otherwise {offset of the first frame, epoch, where...}
-- (session fields "<node>:<sid>" of a user, nodes with members of a room).
local function history_append(keys, args)
  local stream, meta = keys[1], keys[2]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    if redis.call('EXISTS', keys[3]) == 0 then
      return {0}
    end
    epoch = ensure_meta(stream, meta, args[4])
  end
  local first
  local added = 0
  for i = 7, #args do
    local id = redis.call('XADD', stream, 'MAXLEN', args[1], args[2], '0-*', 'frame', args[i])
    first = first or offset_of(id)
    added = added + #args[i]
  end
  account(stream, meta, added, tonumber(args[6]))
  redis.call('PEXPIRE', stream, args[3])
  redis.call('PEXPIRE', meta, args[3])
  local reply = {first, epoch}
  local where
  if args[5] == 'u' then
    where = redis.call('HKEYS', keys[3])
  else
    where = redis.call('SMEMBERS', keys[3])
  end
  for _, w in ipairs(where) do
    reply[#reply + 1] = w
  end
  return reply
end

-- The accounting step of an append made with plain commands (XADD NOMKSTREAM, in the same
-- transaction, just before): KEYS = stream, meta; ARGV = bytes appended, max bytes. Counts
-- only into a live stream (meta and stream both there), so it never makes a key.
-- Returns the bytes the stream holds, or -1 when nothing was counted.
local function history_account(keys, args)
  local stream, meta = keys[1], keys[2]
  if redis.call('EXISTS', stream) == 0 or not redis.call('HGET', meta, 'epoch') then
    return -1
  end
  return account(stream, meta, tonumber(args[1]), tonumber(args[2]))
end

redis.register_function('wsbus_v5_history_append', history_append)
redis.register_function('wsbus_v5_history_account', history_account)
