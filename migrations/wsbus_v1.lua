#!lua name=wsbus_v1
--[[
wsbus Redis functions, version 1.

Loaded by every node at start (FUNCTION LOAD REPLACE) and again whenever a call reports
"Function not found" (Redis restarted empty, or failed over to a replica without them).
A change to a function's behaviour goes into a new file with a new library name (wsbus_v2,
functions wsbus_v2_*), so nodes of two versions can run side by side during a rolling upgrade.

Every function touches exactly one key, so each is a single-slot atomic step on Redis Cluster.
]]

-- The holder of a user key, as {node, sid}; false fields when the key does not exist.
local function holder(key)
  return redis.call('HMGET', key, 'node', 'sid')
end

-- KEYS[1] = P:user:<uid>; ARGV = node, sid, since (ms).
-- {1} when the caller holds the user now (freshly or already), {0, node, sid} when another
-- session holds it.
local function claim(keys, args)
  local cur = holder(keys[1])
  if not cur[1] then
    redis.call('HSET', keys[1], 'node', args[1], 'sid', args[2], 'since', args[3])
    return {1}
  end
  if cur[1] == args[1] and cur[2] == args[2] then
    return {1}
  end
  return {0, cur[1], cur[2] or ''}
end

-- KEYS[1] = P:user:<uid>; ARGV = expected node, expected sid, node, sid, since.
-- Compare-and-set: replaces a holder that the caller found dead. Same replies as claim.
local function take_over(keys, args)
  local cur = holder(keys[1])
  local unchanged = (cur[1] or '') == args[1] and (cur[2] or '') == args[2]
  if unchanged or not cur[1] then
    redis.call('HSET', keys[1], 'node', args[3], 'sid', args[4], 'since', args[5])
    return {1}
  end
  return {0, cur[1], cur[2] or ''}
end

-- KEYS[1] = P:user:<uid>; ARGV = node, sid. Deletes the key only if that session holds it.
local function release(keys, args)
  local cur = holder(keys[1])
  if cur[1] == args[1] and cur[2] == args[2] then
    return redis.call('DEL', keys[1])
  end
  return 0
end

-- KEYS[1] = P:user:<uid>; ARGV = node. Deletes the key if any session of that node holds it
-- (clean shutdown and reaping a dead node).
local function release_node(keys, args)
  if redis.call('HGET', keys[1], 'node') == args[1] then
    return redis.call('DEL', keys[1])
  end
  return 0
end

-- KEYS[1] = P:nodes; ARGV = node id.
-- Records the node's heartbeat at Redis server time, so node clocks never need to agree,
-- and returns {now_ms, id1, last_ms1, id2, last_ms2, ...} for every registered node.
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

redis.register_function('wsbus_v1_claim', claim)
redis.register_function('wsbus_v1_take_over', take_over)
redis.register_function('wsbus_v1_release', release)
redis.register_function('wsbus_v1_release_node', release_node)
redis.register_function('wsbus_v1_heartbeat', heartbeat)
