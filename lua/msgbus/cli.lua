-- msgbus.cli: the `msgbus` command (bin/msgbus). Installs and links services,
-- reports their health, sends, shows the inbox and the dead letters, and runs
-- throwaway local clusters for development. main(argv) returns the exit code:
-- 0 ok, 1 failure, 2 usage error, 3 unhealthy (status).
local argparse = require "argparse"
local msgbus = require "msgbus"
local core = require "msgbus.core"
local cluster = require "msgbus.cluster"

local M = {}

local OK, FAILURE, USAGE, UNHEALTHY, INTERRUPTED = 0, 1, 2, 3, 130

local UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local STATE_FILE = "msgbus-dev.json"

---------------------------------------------------------------------------
-- Output and exits
---------------------------------------------------------------------------

-- Commands end early by raising one of these; main turns it into the exit code.
local Exit = {}
Exit.__index = Exit

local function stop(code, msg)
  error(setmetatable({ code = code, msg = msg }, Exit), 0)
end
local function failure(msg) stop(FAILURE, msg) end
local function usage(msg) stop(USAGE, msg) end

local function say(fmt, ...)
  io.stdout:write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
  io.stdout:flush()
end

local function warn(fmt, ...)
  io.stderr:write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
  io.stderr:flush()
end

-- A library message without its "bad argument #n (...)" wrapping, for users.
local function plain(msg)
  msg = tostring(msg):gsub("^msgbus: ", "")
  return (msg:gsub("^bad argument #%d+ %((.*)%)$", "%1"):gsub("^bad argument #%d+ to '[%w_]+' %((.*)%)$", "%1"))
end

-- Columns padded to their widest cell, two spaces apart; the last is not padded.
local function table_lines(headers, rows)
  local widths = {}
  for i, h in ipairs(headers) do widths[i] = #h end
  for _, r in ipairs(rows) do
    for i = 1, #headers do widths[i] = math.max(widths[i], #tostring(r[i] or "")) end
  end
  local lines = {}
  for _, r in ipairs({ headers, table.unpack(rows) }) do
    local cells = {}
    for i = 1, #headers do
      local cell = tostring(r[i] or "")
      cells[i] = i < #headers and cell .. (" "):rep(widths[i] - #cell) or cell
    end
    lines[#lines + 1] = table.concat(cells, "  "):gsub("%s+$", "")
  end
  return lines
end

local function bytes(n)
  if n == nil then return "-" end
  local units = { "B", "kB", "MB", "GB", "TB" }
  local u, v = 1, n
  while math.abs(v) >= 10240 and u < #units do v, u = v / 1024, u + 1 end
  return u == 1 and ("%d B"):format(n) or ("%d %s"):format(math.floor(v + 0.5), units[u])
end

local function age(s)
  if s == nil then return "-" end
  if s < 60 then return ("%.1fs"):format(s) end
  if s < 3600 then return ("%dm%02ds"):format(s // 60, math.floor(s % 60)) end
  if s < 86400 then return ("%dh%02dm"):format(s // 3600, math.floor(s % 3600 / 60)) end
  return ("%dd%02dh"):format(s // 86400, math.floor(s % 86400 / 3600))
end

local function json_array(t)
  return setmetatable(t, msgbus.array_mt)
end

local function null_if_nil(v)
  if v == nil then return msgbus.null end
  return v
end

-- Seconds since a time of the server's; a clock a hair ahead shows as 0, not < 0.
local function since(v)
  return v and math.max(0.0, v)
end

---------------------------------------------------------------------------
-- Arguments
---------------------------------------------------------------------------

local function seconds(s)
  local n = tonumber(s)
  if not n or n ~= n or n < 0 or n == math.huge then
    return nil, ("%q is not a number of seconds >= 0"):format(s)
  end
  return n
end

local function positive_integer(s)
  local n = math.tointeger(tonumber(s))
  if not n or n < 1 then return nil, ("%q is not a whole number >= 1"):format(s) end
  return n
end

local function check_name(name, option)
  if not pcall(msgbus.check_service, name) then
    usage(("%s: invalid service name %q (use 1 to 24 lowercase letters, digits or _, starting with a letter)")
      :format(option, tostring(name)))
  end
  return name
end

local function check_id(id)
  if type(id) ~= "string" or not id:match(UUID_PATTERN) then
    usage(("%q is not a message id (a UUID)"):format(tostring(id)))
  end
  return id:lower()
end

local function dbinfo(args, option, value)
  local db = value
  if option == "--db" then
    db = args.db
    if db == nil or db == "" then db = os.getenv("MSGBUS_DB") end
  end
  if db == nil or db == "" then
    usage(option == "--db" and "no database: give --db CONNINFO or set MSGBUS_DB" or ("missing " .. option))
  end
  local ok, err = core.conninfo_parse(db)
  if not ok then usage(("%s: %s"):format(option, plain(err))) end
  return db
end

local function connect(args)
  local bus, err = msgbus.connect(dbinfo(args, "--db"))
  if not bus then failure(err) end
  return bus
end

local function exec(bus, sql, ...)
  local rows, affected = bus:exec(sql, ...)
  if not rows then failure(affected) end
  return rows, affected
end

---------------------------------------------------------------------------
-- install, link, unlink
---------------------------------------------------------------------------

local commands = {}

function commands.install(args)
  local db = dbinfo(args, "--db")
  check_name(args.service, "--service")
  local ok, err = msgbus.setup.install(db, args.service)
  if not ok then failure(err) end
  say("installed schema")
  say("service %s", args.service)
end

local function passfile_dir(dir, option)
  if dir ~= nil and (not dir:match("^/[%w_./-]*$") or dir:find("/%.%./") or dir:find("/%.%.$")) then
    usage(("%s must be an absolute path of letters, digits, _ . / -"):format(option))
  end
  return dir
end

local function link_sides(args)
  local me = { service = check_name(args.service, "--service"), conninfo = dbinfo(args, "--db"),
               peer_conninfo = args.advertise and dbinfo(args, "--advertise", args.advertise),
               passfile_dir = passfile_dir(args.passfile_dir, "--passfile-dir") }
  local peer = { service = check_name(args.peer, "--peer"), conninfo = dbinfo(args, "--peer-db", args.peer_db),
                 peer_conninfo = args.peer_advertise and dbinfo(args, "--peer-advertise", args.peer_advertise),
                 passfile_dir = passfile_dir(args.peer_passfile_dir, "--peer-passfile-dir") }
  if me.service == peer.service then usage(("cannot link service %q to itself"):format(me.service)) end
  return me, peer
end

local function literal(s)
  return "'" .. s:gsub("'", "''") .. "'"
end

-- How the subscriber on the other side will reach `side` (what setup.link puts in
-- the subscription's connection string; the password is made fresh each time).
local function subscription_conninfo(side, role, sub)
  local parsed = core.conninfo_parse(side.peer_conninfo or side.conninfo)
  local parts = {}
  for _, k in ipairs { "host", "hostaddr", "port", "dbname", "sslmode" } do
    if parsed[k] and parsed[k] ~= "" then parts[#parts + 1] = k .. "=" .. parsed[k] end
  end
  parts[#parts + 1] = "user=" .. role
  if sub.passfile_dir then
    parts[#parts + 1] = ("passfile=%s/msgbus_%s_to_%s.pgpass"):format(sub.passfile_dir:gsub("/+$", ""), side.service, sub.service)
  else
    parts[#parts + 1] = "password=<new random>"
  end
  return table.concat(parts, " ")
end

-- The steps and SQL calls of msgbus.setup.link, in its order, for --dry-run.
local function link_plan(a, b)
  local lines = {}
  local function add(side, sql, why)
    lines[#lines + 1] = ("%s: %s%s"):format(side.service, sql, why and ("   -- " .. why) or "")
  end
  for _, s in ipairs { a, b } do
    add(s, "install the schema msgbus where missing; select msgbus.configure(" .. literal(s.service) .. ")")
  end
  for _, d in ipairs { { a, b }, { b, a } } do
    local pub, sub = d[1], d[2]
    local role = ("msgbus_%s_%s"):format(pub.service, sub.service)
    add(pub, ("select msgbus.add_peer(%s)"):format(literal(sub.service)),
      ("outbox msgbus.to_%s, publication msgbus_to_%s"):format(sub.service, sub.service))
    add(pub, ("select msgbus.peer_role(%s, <SCRAM verifier of a new random password>, %s)")
      :format(literal(role), literal(sub.service)), "replication role, may read msgbus.to_" .. sub.service .. " only")
    add(pub, ("select pg_create_logical_replication_slot(%s, 'pgoutput')")
      :format(literal(("msgbus_%s_to_%s"):format(pub.service, sub.service))), "if the slot is missing")
  end
  for _, d in ipairs { { a, b }, { b, a } } do
    local pub, sub = d[1], d[2]
    local role = ("msgbus_%s_%s"):format(pub.service, sub.service)
    if sub.passfile_dir then
      add(sub, ("select msgbus.write_passfile(%s, <entry for %s with the new password>)")
        :format(literal(("%s/msgbus_%s_to_%s.pgpass"):format(sub.passfile_dir:gsub("/+$", ""), pub.service, sub.service)),
          role), "the password goes there, not into the catalog")
    end
    add(sub, ("select msgbus.subscribe(%s, %s)"):format(literal(pub.service), literal(subscription_conninfo(pub, role, sub))),
      ("subscription msgbus_%s_to_%s"):format(pub.service, sub.service))
    add(pub, ("select msgbus.resend(%s)"):format(literal(sub.service)), "only if the slot was new")
    add(pub, ("select msgbus.hold(%s); drop and create the slot; select msgbus.release(%s)")
      :format(literal(sub.service), literal(sub.service)), "only if the slot was lost (as msgbus repair)")
  end
  return lines
end

function commands.link(args)
  local me, peer = link_sides(args)
  if args.dry_run then
    say("dry run: linking %s <-> %s would run (nothing is changed):", me.service, peer.service)
    for _, line in ipairs(link_plan(me, peer)) do say("  %s", line) end
    return
  end
  local ok, err = msgbus.setup.link(me, peer, { log = function(line) say(line) end })
  if not ok then failure(err) end
  say("linked %s <-> %s", me.service, peer.service)
end

function commands.repair(args)
  local db = dbinfo(args, "--db")
  local service = args.service and check_name(args.service, "--service")
  if not service then
    local conn, err = core.connect(db, { application_name = "msgbus repair" })
    if not conn then failure(err) end
    local rows
    rows, err = conn:exec("select msgbus.service() as service")
    conn:close()
    if not rows or not rows[1].service then
      failure(err or "this database has no msgbus service installed (give --service, or run msgbus install)")
    end
    service = rows[1].service
  end
  local report, err = msgbus.setup.repair({ service = service, conninfo = db },
    { log = function(line) say(line) end })
  if not report then failure(err) end
  if #report == 0 then say("%s: every link is intact; nothing to repair", service) end
end

function commands.unlink(args)
  local me, peer = link_sides(args)
  local ok, err = msgbus.setup.unlink(me, peer, { force = args.force, log = function(line) say(line) end })
  if not ok then failure(err) end
  say("unlinked %s <-> %s", me.service, peer.service)
end

---------------------------------------------------------------------------
-- status
---------------------------------------------------------------------------

local STATUS_PEERS = [[
select p.service as peer,
       p.batched_acks,
       p.packs,
       format('msgbus_%s_to_%s', p.service, me.service) as sub_name,
       format('msgbus_%s_to_%s', me.service, p.service) as slot_name,
       extract(epoch from now() - p.linked_at)::float8 as linked_age,
       s.oid is not null as sub_exists,
       s.subenabled as sub_enabled,
       w.pid as worker_pid,
       w.last_msg_receipt_time::text as last_receipt,
       extract(epoch from now() - w.last_msg_receipt_time)::float8 as last_receipt_age,
       s.oid::int8 as sub_oid,
       coalesce(e.apply_error_count, 0)::int8 as apply_errors,
       e.stats_reset::text as errors_since,
       r.slot_name is not null as slot_exists,
       r.active as slot_active,
       r.wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn)::int8 as retained_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.confirmed_flush_lsn)::int8 as lag_bytes,
       exists (select 1 from pg_publication_tables t
                where t.pubname = 'msgbus_to_' || p.service
                  and t.schemaname = 'msgbus' and t.tablename = 'to_' || p.service) as published
  from msgbus.peers p
 cross join (select msgbus.service() as service) me
  left join pg_subscription s
         on s.subname = format('msgbus_%s_to_%s', p.service, me.service)
        and s.subdbid = (select oid from pg_database where datname = current_database())
  left join pg_stat_subscription w on w.subid = s.oid and w.relid is null
  left join pg_stat_subscription_stats e on e.subid = s.oid
  left join pg_replication_slots r
         on r.slot_name = format('msgbus_%s_to_%s', me.service, p.service)
        and r.database = current_database()
 order by p.service]]

local STATUS_OUTBOXES = [[
select receiver as peer, sum(msgbus.message_count(type, data))::int8 as depth,
       min(sent_at)::text as oldest_sent_at,
       extract(epoch from now() - min(sent_at))::float8 as oldest_age
  from msgbus.messages
 where receiver <> msgbus.service()
   and not exists (select 1 from msgbus.early_acks e where e.id = messages.id)
 group by receiver]]

-- A session that listens and then stops reading its connection (a bus kept open
-- unused after it waited: every ack and arrival of the service notifies it) leaves
-- its server blocked writing to it, idle, once the socket's buffers are full; the
-- server's notification queue cannot shrink past it from then on, and NOTIFY, which
-- every arrival runs, fails once the queue is full (8 GB by default). The sessions
-- of other roles show only to a role with pg_read_all_stats.
local STATUS_TOTALS = [[
select msgbus.service() as service,
       (select coalesce(sum(msgbus.message_count(type, data)), 0) from msgbus.inbox)::int8 as inbox,
       (select count(*) from msgbus.dead_letters)::int8 as dead_letters,
       pg_notification_queue_usage()::float8 as notify_queue_usage,
       (select coalesce(string_agg(pid::text, ',' order by pid), '') from pg_stat_activity
         where datname = current_database() and state = 'idle' and wait_event = 'ClientWrite') as unread,
       (select t.tgenabled::text from pg_trigger t
         where t.tgrelid = to_regclass(format('msgbus.%I', 'to_' || msgbus.service()))
           and t.tgname = 'arrival') as arrival]]

-- The inbox trigger (msgbus.on_arrival) checks, deduplicates, acknowledges and
-- announces every arriving message. The apply worker runs as a replica, so it fires
-- only when enabled ALWAYS; a plain ENABLE TRIGGER makes it local only, and then
-- arrivals land unchecked and unacknowledged, and their senders' outboxes only grow.
local TRIGGER_MODES = { A = "always", O = "local only", R = "replica only", D = "disabled" }

-- The service's state as one table (the --json shape), with the problems found.
-- PostgreSQL starts a new subscription's worker within wal_retrieve_retry_interval
-- (5 s by default): for this long after a link, a worker not running yet is
-- "starting", not a problem.
local STARTING = 15

local function collect_status(bus, max_ack_age)
  local totals = exec(bus, STATUS_TOTALS)[1]
  local outboxes = {}
  for _, r in ipairs(exec(bus, STATUS_OUTBOXES)) do outboxes[r.peer] = r end
  local unread = json_array {}
  for pid in totals.unread:gmatch("%d+") do unread[#unread + 1] = math.tointeger(tonumber(pid)) end
  local status = {
    service = totals.service, inbox = totals.inbox, dead_letters = totals.dead_letters,
    notify_queue_usage = totals.notify_queue_usage, unread_sessions = unread,
    inbox_trigger = TRIGGER_MODES[totals.arrival] or "missing",
    max_ack_age = max_ack_age, peers = json_array {}, problems = json_array {},
  }
  local problems = status.problems
  if status.inbox_trigger ~= "always" then
    local me = totals.service
    problems[#problems + 1] = ("the inbox trigger is %s: arriving messages are taken unchecked, without dedup or"
      .. " acknowledgement (%s)"):format(status.inbox_trigger, status.inbox_trigger == "missing"
        and ("as the schema's owner: select msgbus.arrival_trigger('to_%s', '%s')"):format(me, me)
        or ("alter table msgbus.to_%s enable always trigger arrival"):format(me))
  end
  if #unread > 0 then
    problems[#problems + 1] = ("sessions that do not read their notifications hold back the server's notification"
      .. " queue (%.4f %% full; NOTIFY, which every arrival runs, fails when it is full): pid %s"
      .. " (a bus that waited once and is not used now: close it)")
      :format(totals.notify_queue_usage * 100, table.concat(unread, ", "))
  end
  local function problem(peer, fmt, ...)
    problems[#problems + 1] = peer .. ": " .. fmt:format(...)
  end
  for _, r in ipairs(exec(bus, STATUS_PEERS)) do
    local out = outboxes[r.peer] or { depth = 0 }
    local p = {
      peer = r.peer,
      -- whether this service acknowledges the peer's transactions of many messages
      -- with one ack row per 100 (the peer said hello: version 12 or later)
      acks = r.batched_acks and "batched" or "single",
      -- how send_many's messages travel to the peer: packs of up to 1,000 (the peer
      -- said hello: version 14 or later), or one row each
      many = r.packs and "packs" or "rows",
      subscription = {
        name = r.sub_name, exists = r.sub_exists, enabled = r.sub_enabled or false,
        worker_running = r.worker_pid ~= nil, worker_pid = null_if_nil(r.worker_pid),
        starting = r.worker_pid == nil and r.linked_age <= STARTING,
        last_msg_receipt = null_if_nil(r.last_receipt), last_msg_receipt_age = null_if_nil(since(r.last_receipt_age)),
        apply_error_count = r.apply_errors, apply_errors_since = null_if_nil(r.errors_since),
      },
      slot = {
        name = r.slot_name, exists = r.slot_exists, active = r.slot_active or false,
        wal_status = null_if_nil(r.wal_status), retained_bytes = null_if_nil(r.retained_bytes),
        lag_bytes = null_if_nil(r.lag_bytes),
      },
      outbox = {
        depth = out.depth, oldest_sent_at = null_if_nil(out.oldest_sent_at),
        oldest_age = null_if_nil(since(out.oldest_age)),
      },
    }
    status.peers[#status.peers + 1] = p
    if not r.sub_exists then
      problem(r.peer, "subscription %s is missing", r.sub_name)
    elseif not r.sub_enabled then
      problem(r.peer, "subscription %s is disabled", r.sub_name)
    elseif not r.worker_pid and not p.subscription.starting then
      problem(r.peer, "subscription %s has no running worker (is the server of %s reachable?)", r.sub_name, r.peer)
    end
    -- apply_error_count is shown but is no health rule: on PostgreSQL 15 a lost
    -- connection to the peer counts too and the count never resets by itself, so one
    -- peer restart would make the service unhealthy for good. A delivery that is
    -- really stuck shows as a stopped worker or an old unacknowledged message.
    if not r.slot_exists then
      problem(r.peer, "replication slot %s is missing", r.slot_name)
    elseif r.wal_status == "lost" then
      problem(r.peer, "replication slot %s is lost (its WAL was removed): run msgbus repair", r.slot_name)
    end
    if not r.published then
      problem(r.peer, "messages to %s are held back by an unfinished repair: run msgbus repair", r.peer)
    end
    if out.oldest_age and out.oldest_age > max_ack_age then
      problem(r.peer, "the oldest unacknowledged message is %s old (limit %s)", age(out.oldest_age), age(max_ack_age))
    end
  end
  status.healthy = #problems == 0
  return status
end

local function print_status(s)
  say("service %s: inbox %d, dead letters %d", s.service, s.inbox, s.dead_letters)
  if #s.peers == 0 then
    say("no peers linked")
  else
    local rows = {}
    for _, p in ipairs(s.peers) do
      local sub, slot, out = p.subscription, p.slot, p.outbox
      local function opt(v, f) if v == msgbus.null then return "-" end return f and f(v) or v end
      rows[#rows + 1] = {
        p.peer,
        not sub.exists and "missing" or (sub.enabled and "enabled" or "disabled"),
        sub.worker_running and "running" or (sub.starting and "starting" or "stopped"),
        opt(sub.last_msg_receipt_age, function(v) return age(v) .. " ago" end),
        sub.apply_error_count,
        not slot.exists and "missing" or (slot.active and "active" or "inactive"),
        opt(slot.wal_status),
        opt(slot.retained_bytes, bytes),
        opt(slot.lag_bytes, bytes),
        out.depth,
        opt(out.oldest_age, age),
        p.acks,
        p.many,
      }
    end
    say("")
    for _, line in ipairs(table_lines({ "PEER", "SUBSCRIPTION", "WORKER", "LAST RECEIPT", "ERRORS", "SLOT", "WAL",
      "RETAINED", "LAG", "OUTBOX", "OLDEST", "ACKS", "MANY" }, rows)) do say(line) end
    say("")
  end
  if s.healthy then
    say("healthy")
  else
    say("unhealthy:")
    for _, p in ipairs(s.problems) do say("  %s", p) end
  end
end

function commands.status(args)
  local bus <close> = connect(args)
  local s = collect_status(bus, args.max_ack_age)
  if args.json then
    say(msgbus.encode(s))
    for _, p in ipairs(s.problems) do warn("unhealthy: %s", p) end
  else
    print_status(s)
  end
  return s.healthy and OK or UNHEALTHY
end

---------------------------------------------------------------------------
-- send, tail
---------------------------------------------------------------------------

function commands.send(args)
  check_name(args.to, "--to")
  local ok, data = pcall(msgbus.decode, args.data)
  if not ok or type(data) ~= "table" or getmetatable(data) == msgbus.array_mt then
    usage(("--data must be a JSON object%s"):format(ok and "" or ": " .. plain(data)))
  end
  local bus <close> = connect(args)
  local sent, id, err = pcall(bus.send, bus, args.to, args.type, data)
  if not sent then usage(plain(id)) end
  if not id then failure(err) end
  say(id)
  if args.wait_ack then
    local acked
    acked, err = bus:wait_ack(id, args.wait_ack)
    if not acked then failure(err) end
  end
end

-- One inbox row as a JSON line.
local function message_json(r)
  return msgbus.encode {
    id = r.id, reply = null_if_nil(r.reply), sender = r.sender, receiver = r.receiver, type = r.type,
    data = r.data, sent_at = r.sent_at, received_at = null_if_nil(r.received_at), attempts = r.attempts,
    last_error = null_if_nil(r.last_error),
  }
end

-- Inbox rows that became visible since the last look: those past the last position
-- printed, and those written by transactions that were still running then (an
-- apply transaction can take its positions before another one that commits first).
local function tail_query(service)
  return ([[
    with snap as (select pg_current_snapshot()::text as snapshot),
    fresh as (
      select m.xmin::text as xid, m.*
        from msgbus."to_%s" m
       where m.pos > $1 or m.xmin::text = any (string_to_array($2, ','))
       order by m.pos desc
       limit $3)
    select snap.snapshot, fresh.* from snap left join fresh on true order by fresh.pos]]):format(service)
end

-- The transaction ids running at a snapshot "xmin:xmax:xip,...", as the 32-bit
-- values row xmin shows.
local function running_xids(snapshot)
  local list = {}
  for x in (snapshot:match("^%d+:%d+:(.*)$") or ""):gmatch("%d+") do
    list[#list + 1] = tostring(math.tointeger(tonumber(x)) % 4294967296)
  end
  return table.concat(list, ",")
end

-- The messages of inbox row `r`: itself, or those of a pack that waits whole
-- (sql/015_pack_rows.sql), as they will be handed out.
local function row_messages(r, into)
  if r.type ~= "msgbus.pack" then
    into[#into + 1] = r
    return
  end
  for i, id in ipairs(r.data.ids) do
    into[#into + 1] = { id = id, sender = r.sender, receiver = r.receiver, type = r.data.type,
                        data = r.data.data[i], sent_at = r.sent_at, received_at = r.received_at,
                        attempts = 0, pos = r.pos }
  end
end

function commands.tail(args)
  local bus <close> = connect(args)
  local sql = tail_query(bus.service)
  -- (a pack's messages, once unpacked, have positions below zero)
  local last, running = math.mininteger, ""
  local printed, printed_count = {}, 0
  -- Prints what is new; returns how many, or nil when the connection was lost
  -- while following (the next look reconnects, and so LISTENs again).
  local function look(limit)
    local rows, err, code = bus:exec(sql, last, running, limit)
    if not rows then
      if args.follow and (code == "closed" or code == "connection") then return nil end
      failure(err)
    end
    local list = {}
    for _, r in ipairs(rows) do
      if r.id then row_messages(r, list) end
      if r.pos and r.pos > last then last = r.pos end
    end
    -- --limit counts messages: the newest of them
    local n, first = 0, limit and math.max(1, #list - limit + 1) or 1
    for i = first, #list do
      local m = list[i]
      if not printed[m.id] then
        say(message_json(m))
        printed[m.id] = m.pos
        printed_count = printed_count + 1
        n = n + 1
      end
    end
    running = running_xids(rows[1].snapshot)
    -- keep memory bounded: only recent ids can come back through `running`
    if printed_count > 20000 then
      for id, pos in pairs(printed) do
        if pos < last - 10000 then printed[id] = nil; printed_count = printed_count - 1 end
      end
    end
    return n
  end
  -- following: LISTEN on the inbox channel (pollfd does) before the first look, so
  -- that nothing that arrives after it goes unnoticed
  if args.follow then
    local fd, err = bus:pollfd()
    if not fd then failure(err) end
  end
  look(args.limit)
  if not args.follow then return end
  local timeout = args.timeout
  local deadline = timeout and core.now() + timeout
  local stale = false
  while true do
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return end
    -- short waits, so that an interrupt is noticed promptly
    local wait = math.min(left or 1, 1)
    local conn, got = bus.conn, nil
    if bus.noted then
      -- a notification came in with a look's answer, and the bus dropped it there:
      -- the socket will not tell of it again, and it may be of a commit after that
      -- look's snapshot (libpq parses what came after the answer in the same read)
      got = {}
    elseif not stale and conn and conn:ok() then
      got = conn:wait(wait)
    end
    if not got then
      stale = true
      core.sleep(wait)
    end
    if stale or #got > 0 or bus.noted then
      bus.noted = nil
      local n = look(nil)
      stale = n == nil
      if n and n > 0 and timeout then deadline = core.now() + timeout end
    end
  end
end

---------------------------------------------------------------------------
-- dead letters
---------------------------------------------------------------------------

local dead = {}

function dead.list(args, bus)
  local rows = exec(bus, [[select id, reply, sender, receiver, type, data, sent_at, received_at, attempts,
                                  last_error, reason, died_at
                             from msgbus.dead_letters order by died_at, id]])
  if args.json then
    for _, r in ipairs(rows) do
      say(msgbus.encode {
        id = r.id, reply = null_if_nil(r.reply), sender = r.sender, receiver = r.receiver, type = r.type,
        data = r.data, sent_at = r.sent_at, received_at = null_if_nil(r.received_at), attempts = r.attempts,
        last_error = null_if_nil(r.last_error), reason = r.reason, died_at = r.died_at,
      })
    end
    return
  end
  if #rows == 0 then say("no dead letters"); return end
  local lines = {}
  for _, r in ipairs(rows) do
    local err = (r.last_error or ""):match("^[^\n]*")
    if #err > 60 then err = err:sub(1, 57) .. "..." end
    lines[#lines + 1] = { r.id, r.sender, r.type, r.attempts, r.reason, r.died_at, err }
  end
  for _, line in ipairs(table_lines({ "ID", "SENDER", "TYPE", "ATTEMPTS", "REASON", "DIED AT", "LAST ERROR" }, lines)) do
    say(line)
  end
end

function dead.retry(args, bus)
  local id = check_id(args.id)
  local rows = exec(bus, "select msgbus.redeliver($1::uuid) as done", id)
  if not rows[1].done then failure(("no dead letter %s"):format(id)) end
  if args.json then say(msgbus.encode { id = id, redelivered = true }) else say("redelivered %s", id) end
end

function dead.drop(args, bus)
  local id = check_id(args.id)
  local _, affected = exec(bus, "delete from msgbus.dead_letters where id = $1::uuid", id)
  if affected == 0 then failure(("no dead letter %s"):format(id)) end
  if args.json then say(msgbus.encode { id = id, dropped = true }) else say("dropped %s", id) end
end

commands["dead-letters"] = function(args)
  if args.id then check_id(args.id) end
  local bus <close> = connect(args)
  return dead[args.dl_command](args, bus)
end

---------------------------------------------------------------------------
-- dev: throwaway local clusters, one per service
---------------------------------------------------------------------------

local shell_quote, read_file = cluster.shell_quote, cluster.read_file

local function write_file(path, text)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, err end
  f:write(text)
  f:close()
  return os.rename(tmp, path)
end

local function exists(path)
  return os.execute("test -e " .. shell_quote(path)) == true
end

local function default_dev_dir()
  local dir = os.getenv("MSGBUS_DEV_DIR")
  if dir and dir ~= "" then return dir end
  return (os.getenv("TMPDIR") or "/tmp") .. "/msgbus-dev"
end

local function dev_state_path(dir)
  return dir .. "/" .. STATE_FILE
end

local function save_state(dir, entries)
  local state = { dir = dir, clusters = json_array {} }
  for i, e in ipairs(entries) do state.clusters[i] = e end
  local ok, err = write_file(dev_state_path(dir), msgbus.encode(state) .. "\n")
  if not ok then return nil, ("msgbus: cannot write %s: %s"):format(dev_state_path(dir), tostring(err)) end
  return true
end

-- cluster.lua runs the server programs from inside the cluster's folder: paths
-- must be absolute. Trailing slashes are dropped so that prefixes compare.
local function absolute(dir)
  if dir:sub(1, 1) ~= "/" then
    local pwd = os.getenv("PWD")
    if not pwd or pwd == "" then
      local p = io.popen("pwd")
      pwd = p and p:read("l") or "."
      if p then p:close() end
    end
    dir = pwd .. "/" .. dir
  end
  dir = dir:gsub("/%./", "/"):gsub("/+$", "")
  return dir ~= "" and dir or "/"
end

local dev = {}

function dev.up(args)
  local dir = absolute(args.dir or default_dev_dir())
  local services, seen = {}, {}
  for name in (args.services .. ","):gmatch("([^,]*),") do
    name = name:match("^%s*(.-)%s*$")
    check_name(name, "--services")
    if seen[name] then usage(("--services: %s is listed twice"):format(name)) end
    seen[name] = true
    services[#services + 1] = name
  end
  if exists(dev_state_path(dir)) then
    failure(("a dev environment is already up in %s (see %s); run 'msgbus dev down --dir %s' first")
      :format(dir, STATE_FILE, dir))
  end
  local entries, started = {}, {}
  local function up()
    for _, name in ipairs(services) do
      local c, err = cluster.start { name = name, base = dir }
      if not c then return nil, err end
      started[#started + 1] = c
      local conninfo = c:conninfo(name)
      entries[#entries + 1] = { service = name, port = c.port, conninfo = conninfo, dir = c.dir,
                                datadir = c.datadir, logfile = c.logfile }
      -- written as soon as a cluster runs, so that dev down can stop it if we die
      local ok
      ok, err = save_state(dir, entries)
      if not ok then return nil, err end
      ok, err = c:createdb(name)
      if not ok then return nil, err end
      ok, err = msgbus.setup.install(conninfo, name)
      if not ok then return nil, err end
      say("%s: cluster on port %d, database %s, msgbus installed", name, c.port, name)
    end
    for i = 1, #entries do
      for j = i + 1, #entries do
        local ok, err = msgbus.setup.link(entries[i], entries[j], { log = function(line) say("  %s", line) end })
        if not ok then return nil, err end
        say("linked %s <-> %s", entries[i].service, entries[j].service)
      end
    end
    return true
  end
  local done, ok, err = pcall(up)
  if not done then ok, err = nil, ok end
  if not ok then
    for i = #started, 1, -1 do started[i]:destroy() end
    os.remove(dev_state_path(dir))
    os.execute("rmdir " .. shell_quote(dir) .. " 2>/dev/null")
    failure(err)
  end
  -- keep the servers after this process exits
  for _, c in ipairs(started) do c:detach() end
  say("")
  say("state: %s", dev_state_path(dir))
  local width = 0
  for _, e in ipairs(entries) do width = math.max(width, #e.service) end
  for _, e in ipairs(entries) do say("%s  %s", e.service .. (" "):rep(width - #e.service), e.conninfo) end
  say("stop with: msgbus dev down --dir %s", dir)
end

local alive = cluster.process_alive

-- Stop the postmaster of `datadir` with SIGINT (PostgreSQL's fast shutdown), then
-- SIGQUIT and SIGKILL if it does not go. Only a pid whose command line names that
-- data folder is signalled, so a reused pid is never hit.
local function stop_server(datadir)
  local pidfile = read_file(datadir .. "/postmaster.pid")
  local pid = pidfile and tonumber(pidfile:match("^%s*(%d+)"))
  if not pid or not alive(pid) then return true end
  local cmdline = (read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
  if not cmdline:find(datadir, 1, true) then return true end
  for _, sig in ipairs { "INT", "QUIT", "KILL" } do
    os.execute(("kill -%s %d 2>/dev/null"):format(sig, pid))
    local deadline = core.now() + (sig == "INT" and 30 or 5)
    while core.now() < deadline do
      if not alive(pid) then return true end
      core.sleep(0.05)
    end
  end
  return nil, ("the server of %s (pid %d) does not stop"):format(datadir, pid)
end

function dev.down(args)
  local dir = absolute(args.dir or default_dev_dir())
  local text = read_file(dev_state_path(dir))
  if not text then
    if exists(dir) then
      failure(("%s has no %s: not a msgbus dev folder, left alone"):format(dir, STATE_FILE))
    end
    say("nothing to stop: no dev environment in %s", dir)
    return
  end
  local ok, state = pcall(msgbus.decode, text)
  if not ok or type(state) ~= "table" or type(state.clusters) ~= "table" then
    failure(("%s is not a msgbus dev state file"):format(dev_state_path(dir)))
  end
  local problems = {}
  for _, c in ipairs(state.clusters) do
    -- only folders msgbus.cluster made, directly inside dir
    local cdir = tostring(c.dir)
    local inside = cdir:sub(1, #dir + 1) == dir .. "/" and cdir:sub(#dir + 2):match("^msgbus%-[%w_]+%.%w+$")
    if not inside then
      problems[#problems + 1] = ("%s: not a cluster folder of %s, left alone"):format(cdir, dir)
    else
      local stopped, err = stop_server(cdir .. "/data")
      if stopped then
        os.execute("rm -rf " .. shell_quote(cdir))
        say("%s: stopped and removed %s", tostring(c.service), cdir)
      else
        problems[#problems + 1] = err
      end
    end
  end
  if #problems > 0 then failure(table.concat(problems, "\n")) end
  os.remove(dev_state_path(dir))
  if os.execute("rmdir " .. shell_quote(dir) .. " 2>/dev/null") == true then
    say("removed %s", dir)
  else
    warn("msgbus: %s is not empty; left in place", dir)
  end
end

commands.dev = function(args)
  return dev[args.dev_command](args)
end

---------------------------------------------------------------------------
-- The parser
---------------------------------------------------------------------------

-- Returns the parser and the full name of each (sub)command parser, for messages.
local function parser()
  local p = argparse("msgbus", "Messages between services that each own a PostgreSQL database.")
    :epilog("Exit codes: 0 ok, 1 failure, 2 usage error, 3 unhealthy (status).\n"
      .. "MSGBUS_DB is the default for --db. Run 'msgbus COMMAND --help' for a command's options.")
    :command_target("command")
  p:flag("--version", "Print the version and exit."):action(function()
    say(msgbus._VERSION)
    os.exit(OK)
  end)
  local names = { [p] = "msgbus" }
  local function command(parent, name, description)
    local c = parent:command(name, description)
    names[c] = names[parent] .. " " .. name
    return c
  end

  local function db(cmd)
    cmd:option("--db", "Connection string (libpq conninfo or URI) of this service's database. Default: $MSGBUS_DB.")
      :argname("CONNINFO")
    return cmd
  end
  local function pair(cmd)
    db(cmd)
    cmd:option("--service", "This service's name."):argname("NAME"):count(1)
    cmd:option("--peer-db", "Connection string of the peer's database."):argname("CONNINFO"):count(1)
    cmd:option("--peer", "The peer service's name."):argname("NAME"):count(1)
    return cmd
  end

  local install = db(command(p, "install", "Install msgbus in a database and make it the home of a service."))
  install:option("--service", "The service's name."):argname("NAME"):count(1)

  local link = pair(command(p, "link", "Link two services both ways (installs msgbus where missing)."))
  link:option("--advertise", "How the peer's server reaches --db. Default: host, port and dbname of --db.")
    :argname("CONNINFO")
  link:option("--peer-advertise", "How this server reaches --peer-db. Default: host, port and dbname of --peer-db.")
    :argname("CONNINFO")
  link:option("--passfile-dir", "A folder on --db's server: its subscription reads the peer's password from a "
    .. "file there (mode 0600) instead of the catalog."):argname("DIR")
  link:option("--peer-passfile-dir", "The same on --peer-db's server."):argname("DIR")
  link:flag("--dry-run", "Print the steps and SQL calls without connecting or changing anything.")

  local unlink = pair(command(p, "unlink", "Remove the link between two services, both ways."))
  unlink:flag("--force", "Unlink even with unacknowledged messages (they are discarded).")

  local repair = db(command(p, "repair",
    "Rebuild links whose replication slot here was lost, and resend what they had not acknowledged."))
  repair:option("--service", "This service's name. Default: the one installed in --db."):argname("NAME")

  local status = db(command(p, "status", "Health of this service's links; exit 3 when unhealthy."))
  status:flag("--json", "One JSON object instead of a table.")
  status:option("--max-ack-age", "Unhealthy when a message waits longer than this for its ack.", "60")
    :argname("SECONDS"):convert(seconds)

  local send = db(command(p, "send", "Send a message; prints its id."))
  send:option("--to", "The receiving service."):argname("SERVICE"):count(1)
  send:option("--type", "The message type."):argname("TYPE"):count(1)
  send:option("--data", "The message data, a JSON object.", "{}"):argname("JSON")
  send:option("--wait-ack", "Wait this long for the acknowledgement; exit 1 on timeout.")
    :argname("SECONDS"):convert(seconds)

  local tail = db(command(p, "tail", "Print inbox messages, one JSON line each, without consuming them."))
  tail:flag("--follow", "Keep printing new arrivals until interrupted (or --timeout).")
  tail:option("--limit", "Print only the newest N messages already there."):argname("N"):convert(positive_integer)
  tail:option("--timeout", "With --follow: stop after this long with nothing new."):argname("SECONDS")
    :convert(seconds)

  local dl = db(command(p, "dead-letters", "List, retry or drop dead letters."))
    :command_target("dl_command")
  dl:flag("--json", "JSON output (one object per line).")
  command(dl, "list", "List the dead letters, oldest first.")
  command(dl, "retry", "Put a dead letter back at the end of the inbox."):argument("id", "The message id."):argname("ID")
  command(dl, "drop", "Delete a dead letter."):argument("id", "The message id."):argname("ID")

  local devc = command(p, "dev", "Throwaway local PostgreSQL clusters, one per service, linked.")
    :command_target("dev_command")
  local up = command(devc, "up", "Start a cluster per service, install msgbus and link them all; print their conninfos.")
  up:option("--dir", "Folder for the clusters and msgbus-dev.json. Default: $MSGBUS_DEV_DIR or $TMPDIR/msgbus-dev.")
    :argname("DIR")
  up:option("--services", "Comma-separated service names.", "store,payments"):argname("LIST")
  local down = command(devc, "down", "Stop the clusters of 'dev up' and remove the folder.")
  down:option("--dir", "The folder given to 'dev up'. Default: as for 'dev up'."):argname("DIR")
  return p, names
end

---------------------------------------------------------------------------
-- main
---------------------------------------------------------------------------

--- main(argv) -> exit code
-- For bus:status(): the same facts as `msgbus status --json`, or nil, err.
function M.status(bus, max_ack_age)
  local ok, res = pcall(collect_status, bus, max_ack_age or 60)
  if ok then return res end
  if getmetatable(res) == Exit then return nil, res.msg end
  error(res, 0)
end

function M.main(argv)
  local p, names = parser()
  local where = p -- the (sub)command being parsed or run, for usage messages
  function p.error(current, msg)
    where = current
    usage(msg)
  end
  local result = table.pack(xpcall(function()
    local args = p:parse(argv)
    for c, name in pairs(names) do
      if name == table.concat({ "msgbus", args.command, args.dl_command or args.dev_command }, " ") then where = c end
    end
    return commands[args.command](args)
  end, function(e)
    if getmetatable(e) == Exit then return e end
    if type(e) == "string" and e:match("interrupted!$") then
      return setmetatable({ code = INTERRUPTED }, Exit)
    end
    local msg = tostring(e)
    if os.getenv("MSGBUS_DEBUG") then msg = debug.traceback(msg, 2) end
    return setmetatable({ code = FAILURE, msg = msg }, Exit)
  end))
  if result[1] then return result[2] or OK end
  local e = result[2]
  if e.msg then
    local msg = e.msg:gsub("^msgbus: ", "")
    if e.code == USAGE then
      warn("%s\n\nError: %s\nRun '%s --help' for help.", where:get_usage(), msg, names[where] or "msgbus")
    else
      warn("msgbus: %s", msg)
    end
  end
  return e.code
end

return M
