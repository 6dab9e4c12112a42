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
fault.read_file = require("msgbus.cluster").read_file

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

-- Where the server logs of the given services end now, for log_errors.
function fault.log_marks(...)
  local marks = { from = {} }
  for _, svc in ipairs { ... } do
    marks.from[svc.cluster] = marks.from[svc.cluster] or log_size(svc.cluster)
  end
  return marks
end

-- The msgbus errors the servers of the given services logged since `marks` (see
-- msgbus_log_errors), as log_errors(s1, s2, ..., marks); each server is read once.
function fault.log_errors(...)
  local args = table.pack(...)
  local marks = args[args.n]
  local bad, seen = {}, {}
  for k = 1, args.n - 1 do
    local c = args[k].cluster
    assert(marks.from[c], "log_errors: the server of " .. args[k].service .. " was not marked by log_marks")
    if not seen[c] then
      seen[c] = true
      for _, line in ipairs(msgbus_log_errors(c, marks.from[c])) do bad[#bad + 1] = line end
    end
  end
  return bad
end

---------------------------------------------------------------------------
-- The checker
---------------------------------------------------------------------------

-- Count what the promise forbids after senders sent "seq" messages { i = ... } to
-- receiver r, each sender numbering its own from 1; print a summary and return the
-- counts. Called as check(label, s, r, sent) for one sender s, or as
-- check(label, { { s1, sent1 }, { s2, sent2 }, ... }, r) for several. `sent` says what
-- one sender sent: confirmed[i] = id of every send that returned (or whose transaction
-- committed), attempted[i] = true of every send tried (a failed one may still have
-- gone out), n_confirmed and n_failed.
-- The result holds the counts over all senders (lost, dup_effects, order, unexpected,
-- mismatch, unacked, outbox_s, outbox_rows_s, apply_errors_r, apply_errors_s, and
-- wait_ack_calls, wait_ack_max), the receiver's (handled, dead, outbox_r, inbox_r) and,
-- in `senders`, the same per-sender counts for each sender in the order given
-- (`service` names it). Handled messages from a service not given count as unexpected.
function fault.check(label, s, r, sent)
  local given = s.service and { { s, sent } } or s
  local c = { senders = {}, from_others = 0 }
  local by_name = {}
  for k, pair in ipairs(given) do
    local p = { svc = pair[1], sent = pair[2], service = pair[1].service, handled = 0, order = 0,
                unexpected = 0, mismatch = 0, repeated_i = 0, lost = 0, unacked = 0, got = {} }
    c.senders[k], by_name[p.service] = p, p
  end
  local rows = env.exec(r, "select msg::text as msg, sender, i from handled order by seq")
  c.handled = #rows
  for _, row in ipairs(rows) do
    local p = by_name[row.sender]
    if not p then
      c.from_others = c.from_others + 1
    else
      p.handled = p.handled + 1
      if p.last and row.i <= p.last then p.order = p.order + 1 end
      p.last = row.i
      if p.got[row.i] then p.repeated_i = p.repeated_i + 1 end
      p.got[row.i] = row.msg
      if not p.sent.attempted[row.i] then p.unexpected = p.unexpected + 1 end
      if p.sent.confirmed[row.i] and p.sent.confirmed[row.i] ~= row.msg then p.mismatch = p.mismatch + 1 end
    end
  end
  -- a dupe is the second handling of a message whose first handling is in `handled`
  local dupes = {}
  for _, row in ipairs(env.exec(r, [[select h.sender, count(*)::int8 as n from dupes d
                                     left join handled h using (msg) group by h.sender]])) do
    dupes[row.sender or false] = row.n
  end
  c.dup_effects = 0
  for sender, n in pairs(dupes) do
    if not by_name[sender] then c.dup_effects = c.dup_effects + n end
  end
  c.dead = env.scalar(r, "select count(*)::int8 from msgbus.dead_letters")
  c.outbox_r, c.inbox_r = fault.outbox(r), fault.inbox(r)
  c.unexpected = c.from_others
  for _, p in ipairs(c.senders) do
    for i in pairs(p.sent.confirmed) do
      if not p.got[i] then p.lost = p.lost + 1 end
    end
    p.dup_effects = (dupes[p.service] or 0) + p.repeated_i
    p.outbox_s, p.outbox_rows_s = fault.outbox(p.svc), fault.outbox_rows(p.svc)
    -- every confirmed message left the outbox (outbox_s above); wait_ack itself is
    -- asked about an even sample of them, first and last included
    local ids = {}
    for i in pairs(p.sent.confirmed) do ids[#ids + 1] = i end
    table.sort(ids)
    local sb = env.connect(p.svc)
    local step = math.max(1, #ids // 20)
    p.wait_ack_calls, p.wait_ack_max = 0, 0
    for k = 1, #ids do
      if k % step == 0 or k == 1 or k == #ids then
        local t0 = core.now()
        if sb:wait_ack(p.sent.confirmed[ids[k]], 10) ~= true then p.unacked = p.unacked + 1 end
        p.wait_ack_calls = p.wait_ack_calls + 1
        p.wait_ack_max = math.max(p.wait_ack_max, core.now() - t0)
      end
    end
    sb:close()
    -- reported here; the tests whose fault loses no connection assert them
    p.apply_errors_r, p.apply_errors_s = fault.apply_errors(r, p.svc), fault.apply_errors(p.svc, r)
    p.got = nil
  end
  -- the totals over all senders
  for _, f in ipairs { "lost", "order", "mismatch", "unacked", "outbox_s", "outbox_rows_s", "apply_errors_r",
                       "apply_errors_s", "wait_ack_calls", "unexpected", "dup_effects" } do
    for _, p in ipairs(c.senders) do c[f] = (c[f] or 0) + p[f] end
  end
  c.wait_ack_max = 0
  for _, p in ipairs(c.senders) do c.wait_ack_max = math.max(c.wait_ack_max, p.wait_ack_max) end

  -- with one sender, the receiver's counts (today's line)
  local function counts(p, of)
    return ("confirmed=%d in_doubt=%d handled=%d lost=%d dup_effects=%d order_violations=%d unexpected=%d")
      :format(p.sent.n_confirmed, p.sent.n_failed, of.handled, p.lost, of.dup_effects, p.order, of.unexpected)
  end
  if #c.senders == 1 then
    local p = c.senders[1]
    print(("\n  [%s] %s dead=%d unacked=%d outbox(sender)=%d inbox=%d apply_errors(receiver)=%d apply_errors(sender)=%d")
      :format(label, counts(p, c), c.dead, c.unacked, c.outbox_s, c.inbox_r, c.apply_errors_r, c.apply_errors_s)
      .. ("\n  [%s] wait_ack on %d acknowledged ids: slowest %.3fs; rows left in the sender's outbox: %d")
        :format(label, c.wait_ack_calls, c.wait_ack_max, c.outbox_rows_s))
  else
    io.write("\n")
    for k, p in ipairs(c.senders) do
      print(("  [%s] sender %d (%s): %s unacked=%d outbox(sender)=%d apply_errors(receiver)=%d apply_errors(sender)=%d; "
        .. "wait_ack on %d acknowledged ids: slowest %.3fs; rows left in its outbox: %d")
        :format(label, k, p.service, counts(p, p), p.unacked, p.outbox_s, p.apply_errors_r, p.apply_errors_s,
          p.wait_ack_calls, p.wait_ack_max, p.outbox_rows_s))
    end
    print(("  [%s] receiver: handled=%d (from other services %d) dup_effects=%d dead=%d inbox=%d outbox(receiver)=%d")
      :format(label, c.handled, c.from_others, c.dup_effects, c.dead, c.inbox_r, c.outbox_r))
  end
  return c
end

-- Every count check() returned that the promise forbids is 0, for each sender.
function fault.assert_promise(c)
  for _, p in ipairs(c.senders) do
    local from = " (sender " .. p.service .. ")"
    assert.equal(0, p.lost, "messages whose send returned were lost" .. from)
    assert.equal(0, p.dup_effects, "a handler's effects were committed twice" .. from)
    assert.equal(0, p.order, "a sender's messages were handled out of order" .. from)
    assert.equal(0, p.unexpected, "a handled message was never sent" .. from)
    assert.equal(0, p.mismatch, "a message arrived under another id" .. from)
    assert.equal(0, p.unacked, "wait_ack did not return true" .. from)
    assert.equal(0, p.outbox_s, "the sender's outbox still holds messages" .. from)
  end
  assert.equal(0, c.unexpected, "a handled message was never sent")
  assert.equal(0, c.dup_effects, "a handler's effects were committed twice")
  assert.equal(0, c.dead, "messages went to the dead letters")
  assert.equal(0, c.outbox_r, "the receiver's outbox still holds acks")
  assert.equal(0, c.inbox_r, "the receiver's inbox still holds messages")
end

return fault
