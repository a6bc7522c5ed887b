#!lua name=wsbus_v2
--[[
wsbus Redis functions, version 2: several sessions per user.

Rooms: P:{r:<room>}:members (hash: user -> space-separated nodes where that user has sessions
in the room) and P:{r:<room>}:nodes (set of nodes with members), hash-tagged by room, written
only when a node gets its first session of a user in the room or loses its last.

A user's sessions live in one hash, P:{u:<uid>}:sessions, field "<node>:<sid>" (node ids never
contain ':'), value the Redis server time of the claim in microseconds (so "oldest" means the
same thing on every node). The key is hash-tagged by user so that later per-user keys (history)
share its slot. Loaded beside wsbus_v1 (FUNCTION LOAD REPLACE at start and whenever a call
reports "Function not found"); every function touches the keys of one slot.
]]

local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

-- The node part of a "<node>:<sid>" field.
local function node_of(field)
  return string.match(field, '^(.*):[^:]*$')
end

-- KEYS[1] = P:{u:<uid>}:sessions; ARGV = node, sid, max sessions, mode ('reject'|'replace'),
-- then the nodes the caller knows to be dead (their sessions are dropped first).
-- Replies: {1} claimed; {0, field...} refused, listing the live holders; {2, field...}
-- claimed after evicting the listed oldest sessions (mode 'replace').
local function claim(keys, args)
  local key = keys[1]
  local me = args[1] .. ':' .. args[2]
  local max = tonumber(args[3])
  if redis.call('HEXISTS', key, me) == 1 then
    return {1}
  end
  local dead = {}
  for i = 5, #args do
    dead[args[i]] = true
  end
  local all = redis.call('HGETALL', key)
  local live = {}
  for i = 1, #all, 2 do
    if dead[node_of(all[i])] then
      redis.call('HDEL', key, all[i])
    else
      live[#live + 1] = {all[i], tonumber(all[i + 1]) or 0}
    end
  end
  if #live < max then
    redis.call('HSET', key, me, now_us())
    return {1}
  end
  if args[4] ~= 'replace' then
    local reply = {0}
    for _, s in ipairs(live) do
      reply[#reply + 1] = s[1]
    end
    return reply
  end
  table.sort(live, function(a, b)
    if a[2] ~= b[2] then
      return a[2] < b[2]
    end
    return a[1] < b[1]
  end)
  local reply = {2}
  for i = 1, #live - max + 1 do
    redis.call('HDEL', key, live[i][1])
    reply[#reply + 1] = live[i][1]
  end
  redis.call('HSET', key, me, now_us())
  return reply
end

-- KEYS[1] = P:{u:<uid>}:sessions; ARGV = node, sid. Removes that session; returns how many
-- sessions the user still has.
local function release(keys, args)
  redis.call('HDEL', keys[1], args[1] .. ':' .. args[2])
  return redis.call('HLEN', keys[1])
end

-- KEYS[1] = P:{u:<uid>}:sessions; ARGV = node. Removes every session of that node (clean
-- shutdown, reaping a dead node); returns how many were removed.
local function release_node(keys, args)
  local fields = redis.call('HKEYS', keys[1])
  local removed = 0
  for _, f in ipairs(fields) do
    if node_of(f) == args[1] then
      redis.call('HDEL', keys[1], f)
      removed = removed + 1
    end
  end
  return removed
end

-- KEYS[1] = P:nodes; ARGV = node id. As wsbus_v1_heartbeat: records the beat at Redis server
-- time and returns {now_ms, id1, last_ms1, ...}.
local function heartbeat(keys, args)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', keys[1], now, args[1])
  local reply = {now}
  local members = redis.call('ZRANGE', keys[1], 0, -1, 'WITHSCORES')
  for i = 1, #members do
    reply[#reply + 1] = members[i]
  end
  return reply
end

-- The nodes of a members-hash value, as a list.
local function split(list)
  local out = {}
  for n in string.gmatch(list or '', '%S+') do
    out[#out + 1] = n
  end
  return out
end

-- Removes nodes in `dead` (a set) from every member of a room and from its node set.
-- Returns the users left with no node.
local function drop_nodes(members, nodes, dead)
  local gone = {}
  local all = redis.call('HGETALL', members)
  for i = 1, #all, 2 do
    local kept = {}
    local changed = false
    for _, n in ipairs(split(all[i + 1])) do
      if dead[n] then
        changed = true
      else
        kept[#kept + 1] = n
      end
    end
    if changed then
      if #kept == 0 then
        redis.call('HDEL', members, all[i])
        gone[#gone + 1] = all[i]
      else
        redis.call('HSET', members, all[i], table.concat(kept, ' '))
      end
    end
  end
  for n in pairs(dead) do
    redis.call('SREM', nodes, n)
  end
  return gone
end

-- KEYS = P:{r:<room>}:members, P:{r:<room>}:nodes; ARGV = user, node, max members, then the
-- nodes the caller knows to be dead (their members are dropped first).
-- Reply: {joined (1, or 0 when the room is full), user is new in the room (1/0),
--         members, first node of the room (1/0)}.
local function room_join(keys, args)
  local user, node, max = args[1], args[2], tonumber(args[3])
  if #args > 3 then
    local dead = {}
    for i = 4, #args do
      dead[args[i]] = true
    end
    drop_nodes(keys[1], keys[2], dead)
  end
  local cur = redis.call('HGET', keys[1], user)
  local count = redis.call('HLEN', keys[1])
  if not cur then
    if count >= max then
      return {0, 0, count, 0}
    end
    redis.call('HSET', keys[1], user, node)
    local first = redis.call('SCARD', keys[2]) == 0 and 1 or 0
    redis.call('SADD', keys[2], node)
    return {1, 1, count + 1, first}
  end
  for _, n in ipairs(split(cur)) do
    if n == node then
      return {1, 0, count, 0}
    end
  end
  redis.call('HSET', keys[1], user, cur .. ' ' .. node)
  local first = redis.call('SCARD', keys[2]) == 0 and 1 or 0
  redis.call('SADD', keys[2], node)
  return {1, 0, count, first}
end

-- KEYS = P:{r:<room>}:members, P:{r:<room>}:nodes; ARGV = user, node, '1' when the node has
-- no member of the room left.
-- Reply: {user left the room entirely (1/0), members, the room has no node left (1/0)}.
local function room_leave(keys, args)
  local user, node = args[1], args[2]
  local kept = {}
  local cur = redis.call('HGET', keys[1], user)
  for _, n in ipairs(split(cur)) do
    if n ~= node then
      kept[#kept + 1] = n
    end
  end
  local gone = 0
  if #kept == 0 then
    gone = cur and 1 or 0
    redis.call('HDEL', keys[1], user)
  else
    redis.call('HSET', keys[1], user, table.concat(kept, ' '))
  end
  if args[3] == '1' then
    redis.call('SREM', keys[2], node)
  end
  local empty = redis.call('SCARD', keys[2]) == 0 and 1 or 0
  return {gone, redis.call('HLEN', keys[1]), empty}
end

-- KEYS = P:{r:<room>}:members, P:{r:<room>}:nodes; ARGV = a node that left (dead, or shut
-- down). Reply: {the room has no node left (1/0), users who left the room entirely...}.
local function room_drop_node(keys, args)
  local gone = drop_nodes(keys[1], keys[2], {[args[1]] = true})
  local reply = {redis.call('SCARD', keys[2]) == 0 and 1 or 0}
  for _, u in ipairs(gone) do
    reply[#reply + 1] = u
  end
  return reply
end

redis.register_function('wsbus_v2_claim', claim)
redis.register_function('wsbus_v2_room_join', room_join)
redis.register_function('wsbus_v2_room_leave', room_leave)
redis.register_function('wsbus_v2_room_drop_node', room_drop_node)
redis.register_function('wsbus_v2_release', release)
redis.register_function('wsbus_v2_release_node', release_node)
redis.register_function('wsbus_v2_heartbeat', heartbeat)
