#!lua name=wsbus_v4
--[[
wsbus Redis functions, version 4: session resume. Loaded beside wsbus_v1 to wsbus_v3; the
session hash is wsbus_v2's (P:{u:<uid>}:sessions, field "<node>:<sid>", value the claim's
Redis time in µs), so nodes of both versions share it during an upgrade.

A session's resume secret is stored as its SHA-256 (hex; the secret itself never reaches
Redis) in the user's slot, beside the claim:
  P:{u:<uid>}:resume   hash: "h:<sha256>" -> "<node>:<sid>", "s:<node>:<sid>" -> "<sha256>"
A secret works once: presenting it removes it, and the session it names gives way to the
presenter whatever the session limit (the old session is evicted and closed with 4006, or is
gone already because its node died). Releasing a session (clean close) forgets its secret; a
session whose node died or shut down keeps it, so that its client can take over from any
node. The hash expires --resume-ttl after the last secret was issued.
]]

local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end

-- The node part of a "<node>:<sid>" field.
local function node_of(field)
  return string.match(field, '^(.*):[^:]*$')
end

-- Takes the secret with hash `hash` out of `rkey`; returns the session it names, or nil.
local function take_secret(rkey, hash)
  local old = redis.call('HGET', rkey, 'h:' .. hash)
  if old then
    redis.call('HDEL', rkey, 'h:' .. hash, 's:' .. old)
  end
  return old
end

-- The live sessions of `key` (dropping those of nodes in `dead`), as {field, claimed at}.
local function live_sessions(key, dead)
  local all = redis.call('HGETALL', key)
  local live = {}
  for i = 1, #all, 2 do
    if dead[node_of(all[i])] then
      redis.call('HDEL', key, all[i])
    else
      live[#live + 1] = {all[i], tonumber(all[i + 1]) or 0}
    end
  end
  return live
end

-- Claims `me` in `key` within `max` sessions: {1} claimed; {0, holders...} refused (mode
-- 'reject'); {2, evicted...} claimed after evicting the oldest (mode 'replace').
local function claim_within(key, me, max, mode, dead)
  local live = live_sessions(key, dead)
  if #live < max then
    redis.call('HSET', key, me, now_us())
    return {1}
  end
  if mode ~= 'replace' then
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

-- KEYS = P:{u:<uid>}:sessions, P:{u:<uid>}:resume.
-- ARGV = node, sid, max sessions, mode ('reject'|'replace'), resume ttl ms, the hash of a new
-- secret for this session ('' for none), the hash of a secret presented ('' for none), then
-- the nodes the caller knows to be dead (their sessions are dropped first).
-- Replies as wsbus_v2_claim ({1}, {0, holders...}, {2, evicted...}), and {3, evicted...}:
-- claimed by taking over the session of the presented secret (evicted lists it if it was
-- still registered, and any session evicted to stay within the limit).
local function claim(keys, args)
  local key, rkey = keys[1], keys[2]
  local me = args[1] .. ':' .. args[2]
  local max, mode = tonumber(args[3]), args[4]
  local dead = {}
  for i = 8, #args do
    dead[args[i]] = true
  end
  local reply
  local old = args[7] ~= '' and take_secret(rkey, args[7]) or nil
  if redis.call('HEXISTS', key, me) == 1 then
    reply = {1}
  elseif old then
    local evicted = {}
    if redis.call('HDEL', key, old) == 1 then
      evicted[1] = old
    end
    -- The holder of a secret is never refused: past the limit, the oldest give way.
    local rest = claim_within(key, me, max, 'replace', dead)
    reply = {3}
    for _, e in ipairs(evicted) do
      reply[#reply + 1] = e
    end
    for i = 2, #rest do
      reply[#reply + 1] = rest[i]
    end
  else
    reply = claim_within(key, me, max, mode, dead)
  end
  if args[6] ~= '' and reply[1] ~= 0 then
    redis.call('HSET', rkey, 'h:' .. args[6], me, 's:' .. me, args[6])
    redis.call('PEXPIRE', rkey, args[5])
  end
  return reply
end

-- KEYS = P:{u:<uid>}:sessions, P:{u:<uid>}:resume; ARGV = node, sid. Removes that session
-- and forgets its secret; returns how many sessions the user still has.
local function release(keys, args)
  local me = args[1] .. ':' .. args[2]
  redis.call('HDEL', keys[1], me)
  local hash = redis.call('HGET', keys[2], 's:' .. me)
  if hash then
    redis.call('HDEL', keys[2], 'h:' .. hash, 's:' .. me)
  end
  return redis.call('HLEN', keys[1])
end

redis.register_function('wsbus_v4_claim', claim)
redis.register_function('wsbus_v4_release', release)
