#!lua name=wsbus_v2
--[[
wsbus Redis functions, version 2: several sessions per user.

A user's sessions live in one hash, P:{u:<uid>}:sessions, field "<node>:<sid>" (node ids never
contain ':'), value the Redis server time of the claim in microseconds (so "oldest" means the
same thing on every node). The key is hash-tagged by user so that later per-user keys (history)
share its slot. Loaded beside wsbus_v1 (FUNCTION LOAD REPLACE at start and whenever a call
reports "Function not found"); every function touches exactly one key.
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

redis.register_function('wsbus_v2_claim', claim)
redis.register_function('wsbus_v2_release', release)
redis.register_function('wsbus_v2_release_node', release_node)
redis.register_function('wsbus_v2_heartbeat', heartbeat)
