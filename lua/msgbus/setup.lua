-- msgbus.setup: install the schema and link services. Needs an administrative
-- connection (a superuser on PostgreSQL 15: creating subscriptions requires it).
-- Every step checks what exists first, so running any of these again is harmless.
local core = require "msgbus.core"

local setup = {}

-- Serializes installs of the schema in one database across processes.
local INSTALL_LOCK = 0x6d736762 -- "msgb"

local MIGRATIONS = { "001_schema", "002_repair", "003_claim", "004_passfile", "005_fast_arrival",
                     "006_fast_ack_check", "007_apply_cost", "008_claim_batch", "009_wait_owner",
                     "010_claim_walk", "011_ordered_ids", "012_batched_acks", "013_batch_arrival",
                     "014_packs", "015_pack_rows", "016_named_replies", "017_type_check" }

local function fail(msg, code)
  return nil, "msgbus: " .. msg, code
end

local function check_service(name)
  return require("msgbus").check_service(name)
end

-- Where the SQL files are: $MSGBUS_SQL_DIR, next to the installed Lua modules
-- (the rock installs them as msgbus/sql/*.sql), or sql/ of a source checkout.
local function sql_path(name)
  local dir = os.getenv("MSGBUS_SQL_DIR")
  if dir and dir ~= "" then return dir .. "/" .. name .. ".sql" end
  local found = package.searchpath("msgbus.sql." .. name, (package.path:gsub("%.lua", ".sql")))
  if found then return found end
  local here = debug.getinfo(1, "S").source:match("^@(.*)/msgbus/setup%.lua$")
  if here then return here .. "/../sql/" .. name .. ".sql" end
  return "sql/" .. name .. ".sql"
end

local function read_sql(name)
  local path = sql_path(name)
  local f, err = io.open(path, "rb")
  if not f then return fail(("cannot read the schema file %s: %s"):format(name, err), "install") end
  local text = f:read("a")
  f:close()
  return text
end

local function connect(conninfo, what)
  if type(conninfo) ~= "string" then
    error(("msgbus: %s: conninfo string expected, got %s"):format(what, type(conninfo)), 3)
  end
  local conn, err, code = core.connect(conninfo, { application_name = "msgbus setup" })
  if not conn then return nil, err, code end
  -- setup passes generated passwords as statement parameters: keep them out of the
  -- server log even where statements are logged (superuser settings; a role that
  -- may not set them could not link anyway)
  conn:script("set log_statement = 'none'; set log_min_duration_statement = -1; "
    .. "set log_parameter_max_length = 0; set log_parameter_max_length_on_error = 0")
  return conn
end

local function in_transaction(conn, fn)
  local ok, err, code = conn:exec("begin")
  if not ok then return nil, err, code end
  ok, err, code = fn()
  if not ok then
    if conn:ok() then conn:exec("rollback") end
    return nil, err, code
  end
  return conn:exec("commit")
end

-- Apply the migrations not yet in the ledger, each in its own transaction under the
-- install lock, then make the database the home of `service`.
local function install(conn, service)
  for version, name in ipairs(MIGRATIONS) do
    local ok, err, code = in_transaction(conn, function()
      local r, e, c = conn:exec("select pg_advisory_xact_lock($1)", INSTALL_LOCK)
      if not r then return nil, e, c end
      r, e, c = conn:script([[
        create schema if not exists msgbus;
        create table if not exists msgbus.migrations (
          version integer primary key,
          name text not null,
          applied_at timestamptz not null default now())]])
      if not r then return nil, e, c end
      r, e, c = conn:exec("select 1 from msgbus.migrations where version = $1", version)
      if not r then return nil, e, c end
      if r[1] then return true end
      local text
      text, e, c = read_sql(name)
      if not text then return nil, e, c end
      r, e, c = conn:script(text)
      if not r then return nil, ("%s (in sql/%s.sql)"):format(e, name), c end
      return conn:exec("insert into msgbus.migrations (version, name) values ($1, $2)", version, name)
    end)
    if not ok then return nil, err, code end
  end
  return in_transaction(conn, function()
    local r, e, c = conn:exec("select pg_advisory_xact_lock($1)", INSTALL_LOCK)
    if not r then return nil, e, c end
    return conn:exec("select msgbus.configure($1)", service)
  end)
end

--- setup.install(conninfo, service) -> true | nil, err, code
function setup.install(conninfo, service)
  check_service(service)
  local conn, err, code = connect(conninfo, "install")
  if not conn then return nil, err, code end
  local ok
  ok, err, code = install(conn, service)
  conn:close()
  if not ok then return nil, err, code end
  return true
end

local function check_side(side, arg)
  if type(side) ~= "table" then
    error(("msgbus: bad argument #%d (table { service = ..., conninfo = ... } expected, got %s)")
      :format(arg, type(side)), 3)
  end
  check_service(side.service)
  if type(side.conninfo) ~= "string" then
    error(("msgbus: bad argument #%d (conninfo string expected, got %s)"):format(arg, type(side.conninfo)), 3)
  end
  if side.peer_conninfo ~= nil and type(side.peer_conninfo) ~= "string" then
    error(("msgbus: bad argument #%d (peer_conninfo must be a string)"):format(arg), 3)
  end
  local dir = side.passfile_dir
  if dir ~= nil and (type(dir) ~= "string" or not dir:match("^/[%w_./-]*$") or dir:find("/%.%./") or dir:find("/%.%.$")) then
    error(("msgbus: bad argument #%d (passfile_dir must be an absolute path of letters, digits, _ . / -)"):format(arg), 3)
  end
end

-- Connection parameters a peer's subscription copies from how we reach a database:
-- where it is and how to talk to it securely, never who we are.
local WHERE = { "host", "hostaddr", "port", "dbname", "sslmode", "sslrootcert", "sslcrl",
  "sslcompression", "sslsni", "requiressl", "gssencmode", "target_session_attrs",
  "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
  "keepalives_count", "tcp_user_timeout", "channel_binding" }

local function quote_conn(v)
  return "'" .. v:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
end

-- The conninfo `sub` uses to read its messages from `pub`: with the password, or
-- naming the passfile that holds it.
local function peer_conninfo(pub, role, password, passfile)
  local parsed, err = core.conninfo_parse(pub.peer_conninfo or pub.conninfo)
  if not parsed then return nil, err, "conninfo" end
  parsed.connect_timeout = parsed.connect_timeout or "10"
  parsed.keepalives_idle = parsed.keepalives_idle or "5"
  local parts = {}
  for _, k in ipairs(WHERE) do
    if parsed[k] and parsed[k] ~= "" then parts[#parts + 1] = k .. "=" .. quote_conn(parsed[k]) end
  end
  parts[#parts + 1] = "user=" .. quote_conn(role)
  if passfile then
    parts[#parts + 1] = "passfile=" .. quote_conn(passfile)
  else
    parts[#parts + 1] = "password=" .. quote_conn(password)
  end
  parts[#parts + 1] = "application_name=" .. quote_conn(role)
  return table.concat(parts, " ")
end

local function names(pub, sub)
  return {
    role = ("msgbus_%s_%s"):format(pub, sub),
    slot = ("msgbus_%s_to_%s"):format(pub, sub),
  }
end

local function open_side(side)
  local conn, err, code = connect(side.conninfo, "link")
  if not conn then return nil, ("%s (connecting to %s)"):format(err, side.service), code end
  local ok
  ok, err, code = install(conn, side.service)
  if not ok then conn:close(); return nil, err, code end
  return conn
end

local function step(log, fmt, ...)
  if log then log(fmt:format(...)) end
end

-- The publishing half: outbox, publication, role and slot on `pub` for `sub`.
local function publish(pconn, pub, sub, log)
  local n = names(pub.service, sub.service)
  local ok, err, code = pconn:exec("select msgbus.add_peer($1)", sub.service)
  if not ok then return nil, err, code end
  step(log, "%s: outbox msgbus.to_%s and publication msgbus_to_%s", pub.service, sub.service, sub.service)
  local password = core.random_hex(24)
  local verifier = pconn:encrypt_password(password, n.role)
  if not verifier then return fail("could not make a password verifier", "link") end
  ok, err, code = pconn:exec("select msgbus.peer_role($1, $2, $3)", n.role, verifier, sub.service)
  if not ok then return nil, err, code end
  step(log, "%s: replication role %s (can read msgbus.to_%s only)", pub.service, n.role, sub.service)
  local rows
  rows, err, code = pconn:exec("select 1 from pg_replication_slots where slot_name = $1", n.slot)
  if not rows then return nil, err, code end
  local new_slot = rows[1] == nil
  if new_slot then
    ok, err, code = pconn:exec("select pg_create_logical_replication_slot($1, 'pgoutput')", n.slot)
    if not ok then return nil, err, code end
    step(log, "%s: replication slot %s", pub.service, n.slot)
  end
  return { role = n.role, password = password, new_slot = new_slot }
end

-- Drop slot `slot` on conn, waiting for its walsender to let go of it.
local function drop_slot(conn, slot, timeout)
  local deadline = core.now() + (timeout or 30)
  local delay = 0.02
  while true do
    local rows, err, code = conn:exec(
      "select active, active_pid from pg_replication_slots where slot_name = $1", slot)
    if not rows then return nil, err, code end
    if not rows[1] then return true end
    if rows[1].active then
      -- the subscriber's walsender may outlive its subscription for a moment
      conn:exec("select pg_terminate_backend($1)", rows[1].active_pid)
    else
      local ok
      ok, err, code = conn:exec("select pg_drop_replication_slot($1)", slot)
      if ok then return true end
      if code ~= "55006" then return nil, err, code end -- 55006: slot in use
    end
    if core.now() > deadline then return fail(("replication slot %s stays in use"):format(slot), "55006") end
    core.sleep(delay)
    delay = math.min(delay * 2, 0.5)
  end
end

-- What a link from this side to `peer` needs rebuilt: "slot" when the slot is lost
-- or missing, "publication" when an interrupted repair left the outbox held, or nil.
local function damage(conn, me, peer)
  local rows, err, code = conn:exec([[
    select (select wal_status from pg_replication_slots
             where slot_name = $1 and database = current_database()) as wal_status,
           exists (select 1 from pg_replication_slots where slot_name = $1) as slot_exists,
           msgbus.published($2) as published]], names(me, peer).slot, peer)
  if not rows then return nil, err, code end
  local r = rows[1]
  if not r.slot_exists or r.wal_status == "lost" then return "slot" end
  if not r.published then return "publication" end
  return false
end

-- Rebuild the sending half of the link me -> peer on conn if it is damaged (see
-- sql/002_repair.sql): hold the outbox back, make a new slot, then publish the
-- outbox again and resend it. Returns what was wrong (or false) and how many
-- messages went out again.
local function repair_peer(conn, me, peer, log)
  local what, err, code = damage(conn, me, peer)
  if what == nil then return nil, err, code end
  if not what then return false, 0 end
  local slot = names(me, peer).slot
  if what == "slot" then
    step(log, "%s: replication slot %s is lost or missing; rebuilding it", me, slot)
    local ok
    ok, err, code = conn:exec("select msgbus.hold($1)", peer)
    if not ok then return nil, err, code end
    step(log, "%s: holding back messages to %s", me, peer)
    ok, err, code = drop_slot(conn, slot)
    if not ok then return nil, err, code end
    ok, err, code = conn:exec("select pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    if not ok then return nil, err, code end
    step(log, "%s: replication slot %s", me, slot)
  end
  local rows
  rows, err, code = conn:exec("select msgbus.release($1) as n", peer)
  if not rows then return nil, err, code end
  step(log, "%s: resent %d unacknowledged message(s) to %s", me, rows[1].n, peer)
  return what, rows[1].n
end

--- setup.repair(side [, opts]) -> report | nil, err, code
-- side = { service = ..., conninfo = ... } (an administrative connection). For every
-- peer whose replication slot here is lost (the peer stayed away longer than
-- max_slot_wal_keep_size allows) or missing, or whose outbox an interrupted repair
-- left held: a new slot, and every unacknowledged message sent again in order; the
-- peer ignores copies it already has. Healthy links are left alone.
-- report = { { peer = "b", repaired = "slot" | "publication", resent = n }, ... }
-- (empty when nothing needed repair). opts.log as for link.
function setup.repair(side, opts)
  check_side(side, 1)
  opts = opts or {}
  local conn, err, code = connect(side.conninfo, "repair")
  if not conn then return nil, err, code end
  local function run()
    local ok, e, c = install(conn, side.service)
    if not ok then return nil, e, c end
    local peers
    peers, e, c = conn:exec("select service from msgbus.peers order by service")
    if not peers then return nil, e, c end
    local report = {}
    for _, p in ipairs(peers) do
      local what, n
      what, n, c = repair_peer(conn, side.service, p.service, opts.log)
      if what == nil then return nil, n, c end
      if what then report[#report + 1] = { peer = p.service, repaired = what, resent = n } end
    end
    return report
  end
  local report
  report, err, code = run()
  conn:close()
  if not report then return nil, err, code end
  return report
end

--- setup.link(a, b [, opts]) -> true | nil, err, code
-- a, b = { service = "store", conninfo = "...", peer_conninfo = "..." (how the other
-- side's server reaches this database; default: conninfo's host, port and dbname) }.
-- opts.log = function(line) for progress lines.
function setup.link(a, b, opts)
  check_side(a, 1)
  check_side(b, 2)
  if a.service == b.service then
    error(("msgbus: cannot link service %q to itself"):format(a.service), 2)
  end
  opts = opts or {}
  local log = opts.log
  local aconn, err, code = open_side(a)
  if not aconn then return nil, err, code end
  local bconn
  bconn, err, code = open_side(b)
  if not bconn then aconn:close(); return nil, err, code end

  local function run()
    local pa, e, c = publish(aconn, a, b, log)
    if not pa then return nil, e, c end
    local pb
    pb, e, c = publish(bconn, b, a, log)
    if not pb then return nil, e, c end
    for _, dir in ipairs { { sub = b, subconn = bconn, pub = a, p = pa, pubconn = aconn },
                           { sub = a, subconn = aconn, pub = b, p = pb, pubconn = bconn } } do
      local passfile = dir.sub.passfile_dir
        and ("%s/%s.pgpass"):format(dir.sub.passfile_dir:gsub("/+$", ""), names(dir.pub.service, dir.sub.service).slot)
      local info
      info, e, c = peer_conninfo(dir.pub, dir.p.role, dir.p.password, passfile)
      if not info then return nil, e, c end
      local ok
      if passfile then
        ok, e, c = dir.subconn:exec("select msgbus.write_passfile($1, $2)", passfile,
          ("*:*:*:%s:%s"):format(dir.p.role, dir.p.password))
        if not ok then return nil, ("%s (writing %s on the server of %s)"):format(e, passfile, dir.sub.service), c end
        step(log, "%s: password for %s in %s (not in the catalog)", dir.sub.service, dir.p.role, passfile)
      end
      ok, e, c = dir.subconn:exec("select msgbus.subscribe($1, $2)", dir.pub.service, info)
      if not ok then
        return nil, ("%s (subscribing %s to %s)"):format(e, dir.sub.service, dir.pub.service), c
      end
      step(log, "%s: subscription msgbus_%s_to_%s", dir.sub.service, dir.pub.service, dir.sub.service)
      -- tell the peer that this side takes one ack row for many messages
      ok, e, c = dir.pubconn:exec("select msgbus.hello($1)", dir.sub.service)
      if not ok then return nil, e, c end
      if dir.p.new_slot then
        -- anything already waiting in the outbox predates the slot: send it again
        local rows
        rows, e, c = dir.pubconn:exec("select msgbus.resend($1) as n", dir.sub.service)
        if not rows then return nil, e, c end
        if rows[1].n > 0 then step(log, "%s: resent %d message(s) to %s", dir.pub.service, rows[1].n, dir.sub.service) end
      else
        -- linking again rebuilds a lost slot
        local what
        what, e, c = repair_peer(dir.pubconn, dir.pub.service, dir.sub.service, log)
        if what == nil then return nil, e, c end
      end
    end
    return true
  end
  local ok
  ok, err, code = run()
  aconn:close()
  bconn:close()
  if not ok then return nil, err, code end
  return true
end

--- setup.unlink(a, b [, opts]) -> true | nil, err, code
-- Refuses while messages either way are unacknowledged, unless opts.force (they are
-- then discarded).
function setup.unlink(a, b, opts)
  check_side(a, 1)
  check_side(b, 2)
  opts = opts or {}
  local log = opts.log
  local aconn, err, code = connect(a.conninfo, "unlink")
  if not aconn then return nil, err, code end
  local bconn
  bconn, err, code = connect(b.conninfo, "unlink")
  if not bconn then aconn:close(); return nil, err, code end
  local function run()
    local sides = { { me = a, conn = aconn, peer = b }, { me = b, conn = bconn, peer = a } }
    if not opts.force then
      for _, s in ipairs(sides) do
        local rows, e, c = s.conn:exec(
          [[select coalesce(sum(msgbus.message_count(m.type, m.data)), 0)::int8 as n from msgbus.messages m where receiver = $1
             and not exists (select 1 from msgbus.early_acks e where e.id = m.id)]], s.peer.service)
        if not rows then return nil, e, c end
        if rows[1].n > 0 then
          return fail(("%d message(s) from %s to %s are not acknowledged yet; wait for them or unlink with force to discard them")
            :format(rows[1].n, s.me.service, s.peer.service), "MB005")
        end
      end
    end
    for _, s in ipairs(sides) do
      -- a passfile the subscription read its password from is blanked
      local sub = names(s.peer.service, s.me.service).slot
      local rows, e, c = s.conn:exec([[select subconninfo from pg_subscription where subname = $1
        and subdbid = (select oid from pg_database where datname = current_database())]], sub)
      if not rows then return nil, e, c end
      local parsed = rows[1] and core.conninfo_parse(rows[1].subconninfo)
      if parsed and parsed.passfile and parsed.passfile:match("/" .. sub .. "%.pgpass$") then
        local ok
        ok, e, c = s.conn:exec("select msgbus.write_passfile($1, '')", parsed.passfile)
        if not ok then return nil, e, c end
      end
    end
    for _, s in ipairs(sides) do
      local ok, e, c = s.conn:exec("select msgbus.unsubscribe($1)", s.peer.service)
      if not ok then return nil, e, c end
      step(log, "%s: dropped subscription msgbus_%s_to_%s", s.me.service, s.peer.service, s.me.service)
    end
    for _, s in ipairs(sides) do
      local n = names(s.me.service, s.peer.service)
      local ok, e, c = drop_slot(s.conn, n.slot)
      if not ok then return nil, e, c end
      ok, e, c = s.conn:exec("select msgbus.remove_peer($1, $2)", s.peer.service, opts.force and true or false)
      if not ok then return nil, e, c end
      ok, e, c = s.conn:exec("select msgbus.drop_peer_role($1)", n.role)
      if not ok then return nil, e, c end
      step(log, "%s: dropped slot, publication, outbox and role for %s", s.me.service, s.peer.service)
    end
    return true
  end
  local ok
  ok, err, code = run()
  aconn:close()
  bconn:close()
  if not ok then return nil, err, code end
  return true
end

return setup
