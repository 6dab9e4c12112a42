-- The checker of the fault specs (spec/40 faults, spec/45 network cut) and the
-- database and log readings it is made of.
--
-- Handlers record every message they handle as (msg uuid primary key, sender, i) in a
-- `handled` table in the receiver's database, in the handler transaction; a handler
-- that finds its row already there records the message in `dupes` instead
-- (prepare_receiver makes both tables). After a fault, check() counts what the
-- promise forbids: sends that returned but whose message was never handled (lost),
-- handler effects committed twice, a sender's messages handled out of order, handled
-- messages that were never sent or arrived under another id, dead letters, sample
-- ids wait_ack does not confirm, and messages still waiting in the sender's outbox,
-- the receiver's outbox (acks) or its inbox. assert_promise() asserts all are 0.
local core = require "msgbus.core"
local assert = require "luassert"
local env = require "helpers.env"

local fault = {}

-- A file's contents from byte `from` on (from the start without it); nil if missing.
function fault.read_file(path, from)
  local f = io.open(path, "rb")
  if not f then return nil end
  if from then f:seek("set", from) end
  local s = f:read("a")
  f:close()
  return s
end

-- { code = times } as "code x2, other x1", or "none".
function fault.codes_text(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = ("%s x%d"):format(k, v) end
  table.sort(parts)
  return #parts > 0 and table.concat(parts, ", ") or "none"
end

---------------------------------------------------------------------------
-- Databases
---------------------------------------------------------------------------

-- Sends not acknowledged yet: in the outbox (the inbox partition excluded) and not
-- acknowledged by msgbus.acked(), the test wait_ack uses (an ack can be recorded
-- before its message leaves the outbox).
function fault.outbox(svc)
  return env.scalar(svc, [[select count(*)::int8 from msgbus.messages m
                           where m.receiver <> msgbus.service() and not msgbus.acked(m.id)]])
end

-- Rows in the outbox, acknowledged or not.
function fault.outbox_rows(svc)
  return env.scalar(svc, "select count(*)::int8 from msgbus.messages where receiver <> msgbus.service()")
end

function fault.inbox(svc)
  return env.scalar(svc, "select count(*)::int8 from msgbus.inbox")
end

function fault.handled(svc)
  return env.scalar(svc, "select count(*)::int8 from handled")
end

-- The tables the handlers write to (see the top of the file).
function fault.prepare_receiver(r)
  env.exec(r, "create table handled (msg uuid primary key, sender text not null, i bigint not null, seq bigserial)")
  env.exec(r, "create table dupes (msg uuid not null, at timestamptz not null default now())")
end

-- The subscription, in the subscriber's database, that brings the publisher's
-- messages (or acks) there; its replication slot on the publisher has the same name.
function fault.sub_name(publisher, subscriber)
  return ("msgbus_%s_to_%s"):format(publisher.service, subscriber.service)
end

-- apply_error_count of the subscription that brings `peer`'s messages into `svc`.
-- PostgreSQL 15 counts a lost connection as an apply error too, so tests whose
-- fault loses connections report it rather than assert it.
function fault.apply_errors(svc, peer)
  return env.scalar(svc, [[select coalesce(sum(apply_error_count), 0)::int8 from pg_stat_subscription_stats
                           where subname = $1]], fault.sub_name(peer, svc))
end

---------------------------------------------------------------------------
-- Server logs
---------------------------------------------------------------------------

local function log_size(c)
  local f = io.open(c.logfile, "rb")
  if not f then return 0 end
  local n = f:seek("end")
  f:close()
  return n
end

-- Server log lines since `from` that show an error msgbus itself caused: an exception
-- raised by a msgbus function, or a failure while applying changes to a msgbus table
-- (a conflict in the apply worker). Lost connections, restarts and replication
-- timeouts do not count.
local function msgbus_log_errors(c, from)
  local bad = {}
  local text = fault.read_file(c.logfile, from) or ""
  local last_error
  for line in text:gmatch("[^\n]+") do
    if line:find("ERROR:", 1, true) or line:find("PANIC:", 1, true) then
      last_error = line
      if line:find("msgbus:", 1, true) or line:find("violates", 1, true) then bad[#bad + 1] = line end
    elseif line:find("CONTEXT:", 1, true) and last_error
        and (line:find("PL/pgSQL function msgbus%.") or line:find('relation "msgbus%.')) then
      bad[#bad + 1] = last_error .. " / " .. line
    elseif not line:find("^%s") then
      last_error = nil
    end
  end
  return bad
end

-- Where the server logs of services s and r end now, for log_errors.
function fault.log_marks(s, r)
  return { s = log_size(s.cluster), r = log_size(r.cluster) }
end

-- The msgbus errors both servers logged since `marks` (see msgbus_log_errors).
function fault.log_errors(s, r, marks)
  local bad = msgbus_log_errors(s.cluster, marks.s)
  for _, line in ipairs(msgbus_log_errors(r.cluster, marks.r)) do bad[#bad + 1] = line end
  return bad
end

---------------------------------------------------------------------------
-- The checker
---------------------------------------------------------------------------

-- Count what the promise forbids after sender s sent "seq" messages { i = ... } to
-- receiver r, print a summary and return the counts. `sent` says what was sent:
-- confirmed[i] = id of every send that returned (or whose transaction committed),
-- attempted[i] = true of every send tried (a failed one may still have gone out),
-- n_confirmed and n_failed.
function fault.check(label, s, r, sent)
  local c = { order = 0, unexpected = 0, mismatch = 0, repeated_i = 0, lost = 0, unacked = 0 }
  local rows = env.exec(r, "select msg::text as msg, sender, i from handled order by seq")
  c.handled = #rows
  local got, last = {}, {}
  for _, row in ipairs(rows) do
    if last[row.sender] and row.i <= last[row.sender] then c.order = c.order + 1 end
    last[row.sender] = row.i
    if got[row.i] then c.repeated_i = c.repeated_i + 1 end
    got[row.i] = row.msg
    if not sent.attempted[row.i] then c.unexpected = c.unexpected + 1 end
    if sent.confirmed[row.i] and sent.confirmed[row.i] ~= row.msg then c.mismatch = c.mismatch + 1 end
  end
  for i in pairs(sent.confirmed) do
    if not got[i] then c.lost = c.lost + 1 end
  end
  c.dup_effects = env.scalar(r, "select count(*)::int8 from dupes") + c.repeated_i
  c.dead = env.scalar(r, "select count(*)::int8 from msgbus.dead_letters")
  c.outbox_s, c.outbox_r, c.inbox_r = fault.outbox(s), fault.outbox(r), fault.inbox(r)
  c.outbox_rows_s = fault.outbox_rows(s)
  -- every confirmed message left the outbox (outbox_s above); wait_ack itself is
  -- asked about an even sample of them, first and last included
  local ids = {}
  for i in pairs(sent.confirmed) do ids[#ids + 1] = i end
  table.sort(ids)
  local sb = env.connect(s)
  local step = math.max(1, #ids // 20)
  c.wait_ack_calls, c.wait_ack_max = 0, 0
  for k = 1, #ids do
    if k % step == 0 or k == 1 or k == #ids then
      local t0 = core.now()
      if sb:wait_ack(sent.confirmed[ids[k]], 10) ~= true then c.unacked = c.unacked + 1 end
      c.wait_ack_calls = c.wait_ack_calls + 1
      c.wait_ack_max = math.max(c.wait_ack_max, core.now() - t0)
    end
  end
  sb:close()
  -- reported here; the tests whose fault loses no connection assert them
  c.apply_errors_r, c.apply_errors_s = fault.apply_errors(r, s), fault.apply_errors(s, r)
  print(("\n  [%s] confirmed=%d in_doubt=%d handled=%d lost=%d dup_effects=%d order_violations=%d "
    .. "unexpected=%d dead=%d unacked=%d outbox(sender)=%d inbox=%d apply_errors(receiver)=%d apply_errors(sender)=%d")
    :format(label, sent.n_confirmed, sent.n_failed, c.handled, c.lost, c.dup_effects, c.order, c.unexpected,
      c.dead, c.unacked, c.outbox_s, c.inbox_r, c.apply_errors_r, c.apply_errors_s)
    .. ("\n  [%s] wait_ack on %d acknowledged ids: slowest %.3fs; rows left in the sender's outbox: %d")
      :format(label, c.wait_ack_calls, c.wait_ack_max, c.outbox_rows_s))
  return c
end

-- Every count check() returned that the promise forbids is 0.
function fault.assert_promise(c)
  assert.equal(0, c.lost, "messages whose send returned were lost")
  assert.equal(0, c.dup_effects, "a handler's effects were committed twice")
  assert.equal(0, c.order, "a sender's messages were handled out of order")
  assert.equal(0, c.unexpected, "a handled message was never sent")
  assert.equal(0, c.mismatch, "a message arrived under another id")
  assert.equal(0, c.dead, "messages went to the dead letters")
  assert.equal(0, c.unacked, "wait_ack did not return true")
  assert.equal(0, c.outbox_s, "the sender's outbox still holds messages")
  assert.equal(0, c.outbox_r, "the receiver's outbox still holds acks")
  assert.equal(0, c.inbox_r, "the receiver's inbox still holds messages")
end

return fault
