"""The Lua scripts behind fleet state: each decision is one atomic script on Redis server time.

Times are integer microseconds of Redis's own clock (``TIME``), so sidecars whose clocks
disagree still agree on the bucket; what a script hands back is a duration, which each
sidecar applies to its own clock. Every key written has an expiry, so a fleet that goes away
leaves nothing behind.
"""

from __future__ import annotations

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
"""

GRANTED, REFUSED, PAUSED = 1, 0, 2
"""The first item of a bucket reservation's answer; the second is microseconds (of waiting
before the token may be used, of waiting it would take, of provider pause left)."""

BUCKET_RESERVE = (
    _NOW
    + """
-- KEYS[1] the bucket's theoretical arrival time, KEYS[2] the end of a provider pause
-- ARGV[1] microseconds between tokens, ARGV[2] burst, ARGV[3] longest wait the caller accepts
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if pause > now then
  return {2, pause - now}
end
local interval = tonumber(ARGV[1])
local tolerance = (tonumber(ARGV[2]) - 1) * interval
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local wait = math.max(0, tat - tolerance - now)
if wait > tonumber(ARGV[3]) then
  return {0, wait}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {1, wait}
"""
)
"""GCRA, as `LocalTokenBucket`: a token is taken only when its wait fits the caller's budget."""

BUCKET_GIVE_BACK = """
-- KEYS[1] the bucket; ARGV[1] microseconds between tokens
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat - tonumber(ARGV[1])), 'KEEPTTL')
end
return 0
"""
"""A reserved token nobody used (its request was cancelled while it waited)."""

PAUSE = (
    _NOW
    + """
-- KEYS[1] the end of a provider pause; ARGV[1] its length in microseconds
local ends = now + tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1]) or '0') < ends then
  redis.call('SET', KEYS[1], string.format('%.0f', ends), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1)
end
return 0
"""
)
"""A provider's Retry-After learned by one sidecar, for all (a longer pause already set stays)."""

PROBE = """
redis.call('SET', KEYS[1], '1', 'PX', 10000)
return 1
"""
"""Whether Redis takes a script that writes, as the fleet's scripts do (the health check)."""

CLOSED, HALF_OPEN, OPEN = 0, 1, 2

_BREAKER_READ = """
local fields = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened', 'trials', 'trial_at', 'version')
local state = tonumber(fields[1] or '0')
local failures = tonumber(fields[2] or '0')
local opened = tonumber(fields[3] or '0')
local trials = tonumber(fields[4] or '0')
local trial_at = tonumber(fields[5] or '0')
local version = tonumber(fields[6] or '0')
local moved = 0
local function save()
  redis.call('HSET', KEYS[1], 'state', state, 'failures', failures, 'opened', string.format('%.0f', opened),
    'trials', trials, 'trial_at', string.format('%.0f', trial_at), 'version', version)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[#ARGV]))
end
"""
"""Breaker state in one hash; the last argument of each breaker script is its expiry (ms)."""

BREAKER_ADMIT = (
    _NOW
    + _BREAKER_READ
    + """
-- ARGV[1] reset_timeout (us), ARGV[2] half_open_max
-- answer: admitted (1/0), state admitted in or refused by, failures, us until half-open, version, moved
local reset = tonumber(ARGV[1])
if state == 2 then
  if now < opened + reset then
    return {0, 2, failures, opened + reset - now, version, 0}
  end
  state, trials, version, moved = 1, 0, version + 1, 1
end
if state == 1 then
  if trials >= tonumber(ARGV[2]) then
    if now - trial_at < reset then
      if moved == 1 then save() end
      return {0, 1, failures, 0, version, moved}
    end
    trials = 0  -- trials unreported for reset_timeout: their sidecar is gone
  end
  trials, trial_at = trials + 1, now
  save()
  return {1, 1, failures, 0, version, moved}
end
return {1, 0, failures, 0, version, 0}
"""
)
"""Open -> half-open after reset_timeout; at most half_open_max trials fleet-wide at once."""

BREAKER_FINISH = (
    _NOW
    + _BREAKER_READ
    + """
-- ARGV[1] the state the attempt was admitted in, ARGV[2] outcome (1 failed, 0 succeeded, -1 neutral),
-- ARGV[3] failure_threshold, ARGV[4] reset_timeout (us), ARGV[5] the version it was admitted at
-- answer: state, failures, us until half-open, version, moved
local admitted, outcome = tonumber(ARGV[1]), tonumber(ARGV[2])
local left = 0
if admitted == 1 and version ~= tonumber(ARGV[5]) then
  -- a trial of an earlier half-open round: its slot went with that round, its result counts for nothing
  if state == 2 then left = math.max(0, opened + tonumber(ARGV[4]) - now) end
  return {state, failures, left, version, 0}
end
if admitted == 1 and trials > 0 then
  trials = trials - 1
end
if outcome == -1 or state == 2 or (state == 1 and admitted ~= 1) then
  -- neutral, or a late result from before the trial: only trials decide half-open
elseif outcome == 1 then
  failures = failures + 1
  if state == 1 or failures >= tonumber(ARGV[3]) then
    state, opened, trials, version, moved = 2, now, 0, version + 1, 1
  end
else
  failures = 0
  if state == 1 then
    state, trials, version, moved = 0, 0, version + 1, 1
  end
end
save()
if state == 2 then left = math.max(0, opened + tonumber(ARGV[4]) - now) end
return {state, failures, left, version, moved}
"""
)
"""One attempt's outcome: consecutive failures open the breaker; a trial closes or reopens it."""
