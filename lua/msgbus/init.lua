-- msgbus: messages between services that each own a PostgreSQL database, carried by
-- logical replication. This module is the policy layer over the C core: argument
-- checks, transactions, the listen loop, waiting and reconnecting.
local core = require "msgbus.core"

local M = {
  _VERSION = "msgbus scm",
  null = core.json_null,
  array_mt = core.json_array_mt,
}

local SERVICE_PATTERN = "^[a-z][a-z0-9_]*$"
local SERVICE_MAX = 24
local TYPE_PATTERN = "^[A-Za-z][A-Za-z0-9_.:-]*$"
local TYPE_MAX = 63
local UUID_PATTERN = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- Connection defaults that make a dead server show up in seconds, not hours.
local CONN_DEFAULTS = {
  application_name = "msgbus",
  connect_timeout = "10",
  keepalives = "1",
  keepalives_idle = "5",
  keepalives_interval = "2",
  keepalives_count = "3",
  tcp_user_timeout = "15000",
}

-- One message: receiver, type, data, reply, delay and ttl (seconds, or null).
local SEND = [[insert into msgbus.messages (receiver, type, data, reply, not_before, expires_at)
               values ($1, $2, $3::jsonb, $4::uuid, now() + make_interval(secs => $5::float8),
                       now() + make_interval(secs => $6::float8)) returning id]]

local SQL = {
  send = SEND,
  -- send with opts.await_reply: the wait is registered in the same statement. A
  -- statement of its own: without the waits clause, the common send costs the server
  -- about 8 µs less.
  send_await = "with m as (" .. SEND .. "), w as (insert into msgbus.waits (id) select id from m) select id from m",
  -- send_many: one statement for a list of messages ($3 is a JSON array of data
  -- objects), packed for a peer that unpacks them (sql/014_packs.sql); the ids come
  -- back in list order
  send_many = "select id from msgbus.send_many($1, $2, $3::jsonb, $4::float8, $5::float8) as id",
  acked = "select msgbus.acked($1::uuid) as acked",
  fail = "select msgbus.fail($1::uuid, $2, $3::integer) as dead",
  take_reply = "select * from msgbus.take_reply($1::uuid)",
  -- a wait belongs to the session that holds it (msgbus.forget_orphaned_waits): this
  -- one takes over a wait registered by send's await_reply on another connection
  wait_add = [[insert into msgbus.waits (id) values ($1::uuid)
               on conflict (id) do update set pid = pg_backend_pid(), orphaned_at = null]],
  wait_del = "delete from msgbus.waits where id = $1::uuid",
  next_due = "select msgbus.next_due() as due",
}

local function fail(msg, code)
  return nil, "msgbus: " .. msg, code
end

-- Whether an error code says the connection was lost (which the waiting calls ride
-- out by reconnecting), rather than that the database refused something.
local function lost(code)
  return code == "closed" or code == "connection"
end

local function check_service(name, arg, what)
  if type(name) ~= "string" then
    error(("msgbus: bad argument #%d (%s: service name expected, got %s)"):format(arg, what, type(name)), 3)
  end
  if #name == 0 or #name > SERVICE_MAX or not name:match(SERVICE_PATTERN) then
    error(("msgbus: bad argument #%d (%s: invalid service name %q: use 1 to %d lowercase letters, digits or _, starting with a letter)")
      :format(arg, what, name, SERVICE_MAX), 3)
  end
  return name
end
M.check_service = function(name) return check_service(name, 1, "service") end

local function check_type(t, arg)
  if type(t) ~= "string" then
    error(("msgbus: bad argument #%d (message type expected, got %s)"):format(arg, type(t)), 3)
  end
  if #t == 0 or #t > TYPE_MAX or not t:match(TYPE_PATTERN) or t:match("^msgbus%.") then
    error(("msgbus: bad argument #%d (invalid message type %q: use 1 to %d letters, digits or _ . : -, starting with a letter; msgbus.* is reserved)")
      :format(arg, t, TYPE_MAX), 3)
  end
  return t
end

local function check_uuid(id, arg, what)
  if type(id) ~= "string" or not id:match(UUID_PATTERN) then
    error(("msgbus: bad argument #%d (%s: message id expected, got %s)")
      :format(arg, what, type(id) == "string" and ("%q"):format(id) or type(id)), 3)
  end
  return id:lower()
end

local function check_timeout(t, arg)
  if t == nil then return nil end
  if math.type(t) == nil or t ~= t or t < 0 or t == math.huge then
    error(("msgbus: bad argument #%d (timeout must be a finite number of seconds >= 0)"):format(arg), 3)
  end
  return t
end

-- data must be a table that encodes as a JSON object; returns its JSON text.
local function encode_data(data, arg)
  if type(data) ~= "table" then
    error(("msgbus: bad argument #%d (data must be a table, got %s)"):format(arg, type(data)), 3)
  end
  local ok, json = pcall(core.json_encode, data)
  if not ok then
    error(("msgbus: bad argument #%d (%s)"):format(arg, tostring(json):gsub("^msgbus: ", "")), 3)
  end
  if json:byte(1) ~= 123 then -- '{'
    error(("msgbus: bad argument #%d (data must be a JSON object, not an array)"):format(arg), 3)
  end
  -- PostgreSQL's jsonb cannot hold U+0000; say so here rather than in a server error
  local at = json:find("\\u0000")
  while at do
    local slashes = #json:sub(1, at):match("\\*$")
    if slashes % 2 == 1 then
      error(("msgbus: bad argument #%d (strings in data cannot contain NUL bytes: PostgreSQL's jsonb cannot store them)")
        :format(arg), 3)
    end
    at = json:find("\\u0000", at + 1)
  end
  return json
end

M.encode = core.json_encode
M.decode = core.json_decode

---------------------------------------------------------------------------
-- Bus
---------------------------------------------------------------------------

local Bus = {}
Bus.__index = Bus
M.Bus = Bus

local function bus_check(self)
  if getmetatable(self) ~= Bus then
    error("msgbus: bad self (msgbus.Bus expected; call methods with ':')", 3)
  end
  if self.closed then
    error("msgbus: bus is closed", 3)
  end
  return self
end

-- Open (or reopen) the connection: LISTEN on the channels this bus has waited on so
-- far (see listen_on) and prepare the statements of the message path.
local function bus_open(self)
  local conn, err, code = core.connect(self.conninfo, self.conn_extra)
  if not conn then return nil, err, code end
  local rows
  rows, err, code = conn:exec("select msgbus.service() as service")
  if not rows then
    conn:close()
    if code == "3F000" or code == "42883" then
      return fail("msgbus is not installed in this database (run msgbus.setup.install first)", code)
    end
    return nil, err, code
  end
  local installed = rows[1].service
  if not installed then
    conn:close()
    return fail("this database has no msgbus service (run msgbus.setup.install first)", "MB004")
  end
  if self.service and self.service ~= installed then
    conn:close()
    return fail(("this database is the service %q, not %q"):format(installed, self.service), "MB003")
  end
  self.service = installed
  local base = "msgbus_" .. installed
  self.channels = { inbox = base, ack = base .. "_ack", reply = base .. "_reply" }
  local listening = {}
  for key in pairs(self.wants) do
    local ok
    ok, err, code = conn:exec("listen " .. conn:escape_identifier(self.channels[key]))
    if not ok then conn:close(); return nil, err, code end
    listening[key] = true
  end
  for name, sql in pairs(SQL) do
    local ok
    ok, err, code = conn:prepare(name, sql)
    if not ok then
      conn:close()
      if code == "42703" or code == "42883" then
        return fail("the msgbus schema of this database is older than this msgbus "
          .. "(run msgbus.setup.install, or msgbus install, on it again to upgrade it)", code)
      end
      return nil, err, code
    end
  end
  self.conn = conn
  self.listening = listening
  self.pid = conn:backend_pid()
  return true
end

-- The waits (send's await_reply, wait_reply) that the bus's previous session held are
-- this session's now: without this, a listener would take the session for gone and
-- forget them, and hand their replies to its handler. Returns false when the
-- connection was lost (again) meanwhile; any other failure (a schema from before
-- migration 009, a role without the grant) leaves the waits as they were, to be
-- forgotten after the listeners' grace, as if this process had died.
local function adopt_waits(conn, old_pid)
  conn:exec("update msgbus.waits set pid = pg_backend_pid(), orphaned_at = null where pid = $1", old_pid)
  return conn:ok()
end

--- msgbus.connect(conninfo [, opts]) -> bus | nil, err, code
function M.connect(conninfo, opts)
  if type(conninfo) ~= "string" then
    error(("msgbus: bad argument #1 to 'connect' (conninfo string expected, got %s)"):format(type(conninfo)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("msgbus: bad argument #2 to 'connect' (options table expected)", 2)
  end
  opts = opts or {}
  if opts.service ~= nil then check_service(opts.service, 2, "opts.service") end
  local max_attempts = opts.max_attempts or 5
  if math.type(max_attempts) ~= "integer" or max_attempts < 1 then
    error("msgbus: bad argument #2 to 'connect' (opts.max_attempts must be an integer >= 1)", 2)
  end
  local wait_grace = opts.wait_grace or 60
  if math.type(wait_grace) == nil or wait_grace ~= wait_grace or wait_grace < 0 or wait_grace == math.huge then
    error("msgbus: bad argument #2 to 'connect' (opts.wait_grace must be a finite number of seconds >= 0)", 2)
  end
  local parsed, perr = core.conninfo_parse(conninfo)
  if not parsed then return nil, perr, "conninfo" end
  local extra = {}
  for k, v in pairs(CONN_DEFAULTS) do
    if parsed[k] == nil then extra[k] = v end
  end
  local self = setmetatable({
    conninfo = conninfo,
    conn_extra = extra,
    service = opts.service,
    max_attempts = max_attempts,
    wait_grace = wait_grace + 0.0,
    max_data_bytes = opts.max_data_bytes or 8 * 1024 * 1024,
    wants = {},  -- the channels (keys of self.channels) to LISTEN on
    dropped = { ack = 0, reply = 0 },  -- see absorb
    depth = 0,
    closed = false,
  }, Bus)
  local ok, err, code = bus_open(self)
  if not ok then return nil, err, code end
  return self
end

function Bus:__tostring()
  if self.closed then return "msgbus.Bus (closed)" end
  return ("msgbus.Bus (%s)"):format(self.service)
end

-- Closing inside a handler or a transaction lets that transaction finish first.
local function finish_close(self)
  if self.closed and self.depth == 0 and self.conn then
    self.conn:close()
    self.conn = nil
  end
end

function Bus:close()
  if getmetatable(self) ~= Bus then error("msgbus: bad self (msgbus.Bus expected)", 2) end
  self.closed = true
  finish_close(self)
end
Bus.__close = Bus.close
Bus.__gc = Bus.close

-- The live connection, reopened if it was lost. Inside a transaction a lost
-- connection cannot be replaced: the transaction is gone.
local function conn_of(self)
  local conn = self.conn
  if conn and conn:ok() then
    -- a handler of listen { batch } touches the database: its savepoint first
    local b = self.batch
    if b and b.due then
      b.due = false
      local ok, err, code = conn:script(b.open and "release savepoint msgbus_message; savepoint msgbus_message"
                                        or "savepoint msgbus_message")
      if not ok then return nil, err, code end
      b.open, b.fresh = true, true
      b.savepoints = b.savepoints + 1
    end
    return conn
  end
  if self.depth > 0 then
    return fail("the connection was lost inside a transaction; it was rolled back", "closed")
  end
  if conn then conn:close(); self.conn = nil end
  local old_pid = self.pid
  local ok, err, code = bus_open(self)
  if not ok then return nil, err, code end
  if old_pid and not adopt_waits(self.conn, old_pid) then
    -- lost before it could adopt them: the next connection adopts them instead
    self.pid = old_pid
    return fail("the connection was lost right after reconnecting", "closed")
  end
  return self.conn
end

-- Run a prepared statement of the message path.
local function run(self, name, ...)
  local conn, err, code = conn_of(self)
  if not conn then return nil, err, code end
  return conn:run(name, ...)
end

-- Reconnect with backoff until the deadline (nil: forever); for the waiting calls.
local function reconnect(self, deadline)
  local delay = 0.05
  while true do
    if self.closed then return fail("bus is closed", "closed") end
    local conn, err, code = conn_of(self)
    if conn then return conn end
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return nil, err, code end
    core.sleep(left and math.min(delay, left) or delay)
    delay = math.min(delay * 2, 2)
  end
end

-- LISTEN on channels ("inbox", "ack", "reply"), from now on and after every
-- reconnect. A bus listens only once it waits: every notification in its database
-- wakes every session that listens there, on whatever channel, so a bus that only
-- sends would otherwise be woken by each message and ack its service receives.
-- Outside a transaction LISTEN takes effect when it returns: whatever the caller
-- reads afterwards, and then waits for, cannot change unnoticed in between. Inside
-- one (pollfd in a handler) it would wait for the commit, or fail in a failed one:
-- the next call outside one, or a reconnect, does it.
local function listen_on(self, ...)
  for i = 1, select("#", ...) do self.wants[select(i, ...)] = true end
  local conn, err, code = conn_of(self)
  if not conn or conn:txstatus() ~= "idle" then return conn, err, code end
  for i = 1, select("#", ...) do
    local key = select(i, ...)
    if not self.listening[key] then
      local ok
      ok, err, code = conn:exec("listen " .. conn:escape_identifier(self.channels[key]))
      if not ok then return nil, err, code end
      self.listening[key] = true
    end
  end
  return conn
end

-- libpq keeps the notifications it reads along with the answers of statements in a
-- list of its own, and a bus reads that list only while it waits. On a bus that
-- listens for acks (it called wait_ack once), every ack of its service, not only of
-- its own messages, would pile up there for as long as it only sends (about 100
-- bytes each, measured); so would every reply on one that called wait_reply. So
-- the calls that do not wait drop them after their statements, outside a
-- transaction, and note what they dropped: an ack or a reply that may be of the
-- message self.unseen names, and the next wait_ack or wait_reply asks before it
-- waits (self.unseen is forgotten; absorb tells send_one the same of the message it
-- just sent); new messages, and bus:timeout()
-- answers 0, so that an event loop steps at once (the socket will not tell it). A
-- bus that dropped UNLISTEN_AFTER acks (replies) since it last waited for one stops
-- listening for them, which also spares its session a wake-up for each (15 to 40 µs
-- of server CPU, and 5 to 10 of its own, a notification, measured); wait_ack
-- (wait_reply) listens again. It never stops listening for new messages: an event
-- loop waits for them on the socket.
local UNLISTEN_AFTER = 1000

-- Whether an ack's or a reply's notification with `payload` may be of message `id`:
-- it names it, or nothing (see may_be).
local function may_name(payload, id)
  return payload == "" or payload == id
end

local function absorb(self, id)
  local conn = self.conn
  if self.depth > 0 or not conn or not conn:ok() then return false, false end
  local notes = conn:queued()
  local ch, dropped = self.channels, self.dropped
  local acked, replied = false, false
  while #notes > 0 do
    for i = 1, #notes do
      local c, p = notes[i].channel, notes[i].payload
      if c == ch.ack or c == ch.reply then
        local mine = may_name(p, id)
        if c == ch.ack then
          dropped.ack, acked = dropped.ack + 1, acked or mine
        else
          dropped.reply, replied = dropped.reply + 1, replied or mine
        end
        local unseen = self.unseen
        if unseen and may_name(p, unseen.id) then self.unseen = nil end
      else
        self.noted = true
      end
    end
    local unlistened = false
    for key, n in pairs(dropped) do
      if n >= UNLISTEN_AFTER and self.listening[key] and conn:txstatus() == "idle" then
        dropped[key] = 0
        unlistened = true
        if conn:exec("unlisten " .. conn:escape_identifier(ch[key])) then
          self.listening[key], self.wants[key] = nil, nil
        end
      end
    end
    if not (unlistened and conn:ok()) then break end
    -- UNLISTEN's answer may come with notifications too (sent before it took effect)
    notes = conn:queued()
  end
  return acked, replied
end

--- bus:exec(sql, ...) -> rows, affected | nil, err, code
function Bus:exec(sql, ...)
  bus_check(self)
  self.unseen = nil
  if type(sql) ~= "string" then
    error(("msgbus: bad argument #1 to 'exec' (SQL string expected, got %s)"):format(type(sql)), 2)
  end
  local conn, err, code = conn_of(self)
  if not conn then return nil, err, code end
  local r1, r2, r3 = conn:exec(sql, ...)
  absorb(self)
  return r1, r2, r3
end

local function simple(self, sql)
  local conn, err, code = conn_of(self)
  if not conn then return nil, err, code end
  return conn:exec(sql)
end

--- bus:transaction(fn, ...) -> fn's results (true if none) | nil, err
-- Runs fn(...) in a transaction (a savepoint when nested); commits if it returns,
-- rolls back if it raises.
function Bus:transaction(fn, ...)
  bus_check(self)
  self.unseen = nil
  if type(fn) ~= "function" then
    error(("msgbus: bad argument #1 to 'transaction' (function expected, got %s)"):format(type(fn)), 2)
  end
  local depth = self.depth
  local sp = "msgbus_sp" .. depth
  local ok, err, code = simple(self, depth == 0 and "begin" or ("savepoint " .. sp))
  if not ok then return nil, err, code end
  self.depth = depth + 1
  local res = table.pack(xpcall(fn, debug.traceback, ...))
  self.depth = depth
  if not res[1] then
    -- an error object (a table) is passed back as it is
    local msg = res[2]
    if type(msg) ~= "table" then msg = tostring(msg) end
    if self.conn and self.conn:ok() then
      if depth == 0 then
        self.conn:exec("rollback")
      else
        self.conn:exec("rollback to savepoint " .. sp)
        self.conn:exec("release savepoint " .. sp)
      end
    end
    absorb(self)
    finish_close(self)
    return nil, msg, "error"
  end
  ok, err, code = simple(self, depth == 0 and "commit" or ("release savepoint " .. sp))
  if not ok then
    if depth == 0 and self.conn and self.conn:ok() then self.conn:exec("rollback") end
    return nil, err, code
  end
  if depth == 0 and self.conn:txstatus() ~= "idle" then
    -- COMMIT of a failed transaction answers ROLLBACK without an error
    return fail("the transaction failed and was rolled back", "rollback")
  end
  absorb(self)
  finish_close(self)
  if res.n == 1 then return true end
  return table.unpack(res, 2, res.n)
end

local function translate(err, code, receiver)
  if code == "MB001" then
    return fail(("unknown receiver %q: it is not linked to this service"):format(receiver), code)
  end
  return nil, err, code
end

local function check_seconds(v, arg, what, positive)
  if v == nil then return nil end
  if math.type(v) == nil or v ~= v or v < 0 or v == math.huge or (positive and v == 0) then
    error(("msgbus: bad argument #%d (%s must be a finite number of seconds %s 0)")
      :format(arg, what, positive and ">" or ">="), 3)
  end
  return v + 0.0
end

local function send_one(self, receiver, mtype, json, reply, await, delay, ttl)
  if receiver == self.service then
    return fail(("service %q cannot send to itself"):format(receiver), "MB002")
  end
  local rows, err, code = run(self, await and "send_await" or "send", receiver, mtype, json, reply, delay, ttl)
  if not rows then return translate(err, code, receiver) end
  local id = rows[1].id
  -- Committed on its own, on a connection that was listening for acks already: its
  -- ack's notification cannot have been missed, so wait_ack(id) may wait for it
  -- before it asks (see wait_ack), unless it came already: libpq parses what the
  -- server sent right after an answer in the same read, and on a loaded machine the
  -- whole way to the receiver and back can fit between the two. The same for its
  -- reply and wait_reply, when this session registered the wait (await_reply) and
  -- listens for replies. Whatever reads or drops a notification that may be of
  -- this message forgets this.
  local acked, replied = absorb(self, id)
  self.unseen = nil
  if self.depth == 0 and self.conn:txstatus() == "idle" then
    local for_ack = not acked and self.listening.ack
    local for_reply = await and not replied and self.listening.reply
    if for_ack or for_reply then
      self.unseen = { id = id, conn = self.conn, ack = for_ack, reply = for_reply }
    end
  end
  return id
end

--- bus:send(receiver, type, data [, opts]) -> id | nil, err, code
-- receiver may be an array of service names (a broadcast): one message each, in one
-- transaction, and the result is the array of their ids.
-- opts.await_reply: register now that a wait_reply call will take the reply, so
-- that a listen handler never gets it. opts.delay: not handed to a handler before
-- that many seconds. opts.ttl: moved to the dead letters ("expired") if not handled
-- within that many seconds.
function Bus:send(receiver, mtype, data, opts)
  bus_check(self)
  local receivers
  if type(receiver) == "table" then
    if #receiver == 0 then error("msgbus: bad argument #1 (a broadcast needs at least one receiver)", 2) end
    receivers = {}
    for i = 1, #receiver do receivers[i] = check_service(receiver[i], 1, "receiver") end
  else
    check_service(receiver, 1, "receiver")
  end
  check_type(mtype, 2)
  local json = encode_data(data, 3)
  local reply, await, delay, ttl = nil, false, nil, nil
  if opts ~= nil then
    if type(opts) ~= "table" then error("msgbus: bad argument #4 to 'send' (options table expected)", 2) end
    if opts.reply ~= nil then reply = check_uuid(opts.reply, 4, "opts.reply") end
    await = opts.await_reply and true or false
    delay = check_seconds(opts.delay, 4, "opts.delay")
    ttl = check_seconds(opts.ttl, 4, "opts.ttl", true)
  end
  if #json > self.max_data_bytes then
    return fail(("message data is %d bytes, more than the limit of %d"):format(#json, self.max_data_bytes), "too_large")
  end
  if not receivers then
    return send_one(self, receiver, mtype, json, reply, await, delay, ttl)
  end
  local ids = {}
  local ok, err, code = self:transaction(function()
    for i, r in ipairs(receivers) do
      local id, e, c = send_one(self, r, mtype, json, reply, await, delay, ttl)
      if not id then error({ e, c }) end
      ids[i] = id
    end
  end)
  if not ok then
    if type(err) == "table" then return nil, err[1], err[2] end
    return nil, err, code
  end
  return ids
end

--- bus:send_many(receiver, type, list [, opts]) -> ids | nil, err, code
-- One message per element of list (an array of data tables), all to one receiver,
-- with one type, in one statement: one round trip for the lot, in list order, all
-- or none. opts.delay and opts.ttl as for send. ids are in list order.
local MANY_MAX = 10000

function Bus:send_many(receiver, mtype, list, opts)
  bus_check(self)
  check_service(receiver, 1, "receiver")
  check_type(mtype, 2)
  if type(list) ~= "table" or #list == 0 then
    error("msgbus: bad argument #3 to 'send_many' (a non-empty array of data tables expected)", 2)
  end
  if #list > MANY_MAX then
    error(("msgbus: bad argument #3 to 'send_many' (at most %d messages at once)"):format(MANY_MAX), 2)
  end
  local delay, ttl
  if opts ~= nil then
    if type(opts) ~= "table" then error("msgbus: bad argument #4 to 'send_many' (options table expected)", 2) end
    delay = check_seconds(opts.delay, 4, "opts.delay")
    ttl = check_seconds(opts.ttl, 4, "opts.ttl", true)
  end
  local parts = {}
  for i = 1, #list do
    local ok, json = pcall(encode_data, list[i], 3)
    if not ok then
      local msg = tostring(json)
      error(((msg:match("msgbus: .*$") or msg):gsub("%(", ("to 'send_many' (element %d: "):format(i), 1)), 2)
    end
    if #json > self.max_data_bytes then
      return fail(("message data of element %d is %d bytes, more than the limit of %d")
        :format(i, #json, self.max_data_bytes), "too_large")
    end
    parts[i] = json
  end
  if receiver == self.service then
    return fail(("service %q cannot send to itself"):format(receiver), "MB002")
  end
  local rows, err, code = run(self, "send_many", receiver, mtype, "[" .. table.concat(parts, ",") .. "]", delay, ttl)
  if not rows then return translate(err, code, receiver) end
  absorb(self)
  local ids = {}
  for i, r in ipairs(rows) do ids[i] = r.id end
  return ids
end

--- bus:reply(msg, type, data) -> id | nil, err, code
function Bus:reply(msg, mtype, data)
  bus_check(self)
  if type(msg) ~= "table" then
    error(("msgbus: bad argument #1 to 'reply' (message table expected, got %s)"):format(type(msg)), 2)
  end
  check_service(msg.sender, 1, "msg.sender")
  check_uuid(msg.id, 1, "msg.id")
  return self:send(msg.sender, mtype, data, { reply = msg.id })
end

-- Wait for something on this bus's channels until the deadline; reconnects (and so
-- re-listens) if the connection is lost. Returns true and the notifications that
-- came (nil after a reconnect), or nil, err, code.
local RECHECK = 5 -- seconds: re-read state this often even without a notification

local function wait_event(self, deadline, recheck)
  self.unseen = nil
  local before = self.conn
  local conn, err, code = reconnect(self, deadline)
  if not conn then return nil, err, code end
  -- a new connection may have missed notifications: the caller re-reads state now
  if conn ~= before then return true, nil end
  local left = deadline and math.max(0, deadline - core.now())
  if recheck and (not left or left > recheck) then left = recheck end
  local got
  got, err, code = conn:wait(left)
  if not got then
    -- lost: reconnect (which listens again); the caller then re-reads state
    if not reconnect(self, deadline) then return nil, err, code end
    return true, nil
  end
  return true, got
end

-- Whether `notes` has the notification on `channel` that names `id`: the inbox
-- trigger names the message of the first ack of each transaction of acks (012).
local function named(notes, channel, id)
  if notes then
    for _, n in ipairs(notes) do
      if n.payload == id and n.channel == channel then return true end
    end
  end
  return false
end

-- Whether a wake-up of wait_ack or wait_reply can mean that what it waits for
-- (message `id` acked, or a reply to it) came: a timeout or a new connection (no
-- notifications), or a notification on `channel` that names `id` or nothing. The
-- first ack (reply) of a transaction names its message, and the transaction's others
-- fold into one unnamed notification; so one that names another message means that
-- its transaction was that one's, and, if it had others, an unnamed one comes too.
-- Without this, each bus of a service that waits would ask the server once for every
-- ack (reply) of every other one; a notification on another channel (a bus that
-- waits for acks and replies, or runs an event loop, listens on several) tells
-- nothing either.
local function may_be(notes, channel, id)
  if not notes or #notes == 0 then return true end
  for _, n in ipairs(notes) do
    if n.channel == channel and may_name(n.payload, id) then return true end
  end
  return false
end

-- Whether wait_ack (wait_reply), woken with `notes`, asks the server again: when they
-- may be of `id`, at least every RECHECK seconds since it last `asked` (other
-- messages' acks and replies may keep it awake), and once more at the deadline.
local function ask_again(notes, channel, id, asked, deadline)
  local now = core.now()
  return may_be(notes, channel, id) or now - asked >= RECHECK or (deadline ~= nil and now >= deadline)
end

-- Whether `id` is the message this bus just sent on its own (see send_one), with
-- nothing in between, and `what` ("ack", "reply") cannot have come unnoticed.
local function unseen_for(self, id, what)
  local unseen = self.unseen
  return unseen ~= nil and unseen[what] and unseen.id == id and unseen.conn == self.conn and self.conn:ok()
end

local function timed_out(what)
  return fail(what .. ": timeout", "timeout")
end

--- bus:wait_ack(id [, timeout]) -> true | nil, err, code
function Bus:wait_ack(id, timeout)
  bus_check(self)
  id = check_uuid(id, 1, "id")
  timeout = check_timeout(timeout, 2)
  if self.depth > 0 then
    error("msgbus: wait_ack cannot be called inside a transaction (the message is not sent until it commits)", 2)
  end
  local deadline = timeout and core.now() + timeout
  self.dropped.ack = 0
  -- a lost connection is taken up by the loop, whose reconnect listens again
  local _, lerr, lcode = listen_on(self, "ack")
  if lerr and not lost(lcode) then return nil, lerr, lcode end
  -- Right after this bus sent `id` on its own (see send_one), its ack cannot have
  -- come unnoticed: wait for a notification first, which saves asking once.
  local ask = not unseen_for(self, id, "ack")
  local asked = core.now()
  while true do
    local rows, err, code
    if ask then
      asked = core.now()
      rows, err, code = run(self, "acked", id)
      if rows then
        if rows[1].acked then return true end
      elseif not lost(code) then
        return nil, err, code
      end
      if deadline and core.now() >= deadline then
        return timed_out(("no acknowledgement for %s"):format(id))
      end
    end
    local ok, notes
    ok, notes, code = wait_event(self, deadline, RECHECK)
    if ok then
      if named(notes, self.channels.ack, id) then return true end
      ask = ask_again(notes, self.channels.ack, id, asked, deadline)
    elseif not lost(code) then
      return nil, notes, code
    else
      ask = true
    end
  end
end

-- The columns of an inbox row a handler sees (README: bus:listen): listen reads
-- claim's and claim_batch's rows with these only (a timestamp's text costs).
local MESSAGE_COLUMNS = "id, reply, sender, receiver, type, data, sent_at, received_at, expires_at, attempts, last_error"
local CLAIM = "begin; select " .. MESSAGE_COLUMNS .. " from msgbus.claim()"
local CLAIM_BATCH = "begin; select " .. MESSAGE_COLUMNS .. " from msgbus.claim_batch(%d)"

-- An inbox row as the handler sees it: the receiver's scheduling columns are internal.
local function to_message(row)
  row.data = row.data or {}
  row.available_at, row.pos, row.not_before = nil, nil, nil
  return row
end

--- bus:wait_reply(id [, timeout]) -> msg | nil, err, code
function Bus:wait_reply(id, timeout)
  bus_check(self)
  id = check_uuid(id, 1, "id")
  timeout = check_timeout(timeout, 2)
  if self.depth > 0 then
    error("msgbus: wait_reply cannot be called inside a transaction", 2)
  end
  local deadline = timeout and core.now() + timeout
  self.dropped.reply = 0
  local _, lerr, lcode = listen_on(self, "reply")
  if lerr and not lost(lcode) then return nil, lerr, lcode end
  -- the connection whose session holds the wait: register again on a new one, in
  -- case a listener forgot the wait while this bus was away longer than its grace.
  -- Right after this bus sent `id` with await_reply on its own, on a connection that
  -- listened for replies already (see send_one), its session holds the wait and the
  -- reply's notification cannot have been missed: wait for one before looking.
  local fast = unseen_for(self, id, "reply")
  local held = fast and self.conn or nil
  local ask, asked = not fast, core.now()
  while true do
    if ask then
      local rows, err, code
      asked = core.now()
      if not held or held ~= self.conn or not held:ok() then
        held = nil
        rows, err, code = run(self, "wait_add", id)
        if rows then held = self.conn end
      end
      if held then
        rows, err, code = run(self, "take_reply", id)
        if rows and rows[1] then return to_message(rows[1]) end
      end
      if not rows and not lost(code) then return nil, err, code end
      if deadline and core.now() >= deadline then
        run(self, "wait_del", id)
        return timed_out(("no reply to %s"):format(id))
      end
    end
    local ok, notes, code = wait_event(self, deadline, RECHECK)
    if not ok and not lost(code) then return nil, notes, code end
    ask = not ok or ask_again(notes, self.channels.reply, id, asked, deadline)
  end
end

-- One message through the handler, in one transaction. Returns "handled", "failed",
-- "empty", or nil, err, code when the database could not be reached.
local run_vacuum

-- The handler on one claimed row, inside the caller's transaction (depth 1 makes
-- the bus's own calls join it, and defers a close until it ends).
local function run_handler(self, handler, row)
  local msg = to_message(row)
  self.depth = 1
  local ok, err = xpcall(handler, debug.traceback, msg)
  self.depth = 0
  return msg, ok, err
end

-- Whether message `id` is still in the inbox (after a rollback).
local function still_there(conn, id)
  local rows = conn:exec("select 1 as x from msgbus.inbox where id = $1::uuid", id)
  return not rows or rows[1] ~= nil
end

-- Messages through the handler one transaction each, up to `limit` in a row: after a
-- handled message, its done, its commit and the next claim go in one round trip.
-- Returns what ended the run ("handled": the limit, or the bus was closed; "empty";
-- "failed": a handler failed and its attempt is recorded) and how many were handled,
-- with "empty" also the seconds until the next held-back message comes due (as
-- msgbus.next_due; false: none); or nil, how many were handled, err, code when the
-- database could not be reached.
local function listen_once(self, handler, limit)
  local conn, err, code = conn_of(self)
  if not conn then return nil, 0, err, code end
  local rows
  rows, err, code = conn:script(CLAIM)
  if not rows then
    if conn:ok() then conn:exec("rollback") end
    return nil, 0, err, code
  end
  local n = 0
  while rows[1] do
    local msg, hok, herr = run_handler(self, handler, rows[1])
    if hok then
      local more = n + 1 < limit and not self.closed
      -- the id comes from the database, in canonical form: safe to inline
      local sql = ("select msgbus.done('%s'); commit"):format(msg.id)
      rows, err, code = conn:script(more and sql .. "; " .. CLAIM or sql)
      if rows and conn:txstatus() == (more and "intrans" or "idle") then
        n = n + 1
        if not more then return "handled", n end
      else
        -- the handler's own SQL failed and aborted the transaction, or done or the
        -- commit failed: the message stays; or the next claim failed after the commit
        local state = conn:txstatus()
        if conn:ok() and state ~= "idle" then conn:exec("rollback") end
        if not conn:ok() then return nil, n, err or "the connection was lost", code or "closed" end
        if more and state == "inerror" and not still_there(conn, msg.id) then
          return nil, n + 1, err, code
        end
        hok, herr = false, err or "the transaction was rolled back"
      end
    end
    if not hok then
      if conn:ok() and conn:txstatus() ~= "idle" then conn:exec("rollback") end
      if not conn:ok() then return nil, n, err or tostring(herr), code or "closed" end
      rows, err, code = conn:run("fail", msg.id, tostring(herr), self.max_attempts)
      if not rows then return nil, n, err, code end
      return "failed", n
    end
  end
  -- nothing more now: end the transaction, and ask when a message held back for a
  -- retry or a delay comes due (false: none is), in the same round trip
  rows = conn:script("commit; select msgbus.next_due() as due")
  if not rows then
    if conn:ok() and conn:txstatus() ~= "idle" then conn:exec("rollback") end
    return "empty", n
  end
  return "empty", n, nil, nil, rows[1] and rows[1].due or false
end

-- A handler that uses the database runs in a subtransaction of its own, and
-- PostgreSQL keeps 64 of them per backend in shared memory before every other
-- session's snapshots get slower (they look each one up in pg_subtrans): a batch
-- ends after this many such handlers, and the messages after them wait for the next
-- one. Handlers that do not touch the database have the whole batch.
local MAX_SUBXACTS = 64

-- Up to `limit` messages through the handler in one transaction, taken with one
-- msgbus.claim_batch and consumed with one msgbus.done_many. Each handler that
-- touches the database through the bus does so under its own savepoint, opened on
-- its first call (conn_of), so that a handler that raises rolls back its own work
-- and its message is counted as a failed attempt, in the same transaction; the others
-- go on, except the later messages of the failed one's sender, which stay in the
-- inbox for the next batch (a sender's messages are handled in order). A message
-- leaves the inbox when the batch commits, together with its handler's writes, so
-- effects still commit exactly once. Returns handled, tried (0 tried: the inbox had
-- nothing available), or nil, err, code. When the commit itself fails, nothing of
-- the batch happened: "single" is returned, and listen hands the next messages out
-- one transaction each, which tells whose work made the commit fail.
local function listen_batch_in(self, handler, limit, b)
  local conn, err, code = conn_of(self)
  if not conn then return nil, err, code end
  local function abort(e, c)
    if conn:ok() then conn:exec("rollback") end
    return nil, e, c or "closed"
  end
  local rows
  rows, err, code = conn:script(CLAIM_BATCH:format(limit))
  if not rows then return abort(err, code) end
  local done, failed = {}, {}
  local tried = 0
  for _, row in ipairs(rows) do
    -- the rest stays in the inbox for the next batch, in order
    if self.closed or b.savepoints >= MAX_SUBXACTS then break end
    if not failed[row.sender] then
      tried = tried + 1
      b.due, b.fresh = true, false
      local msg, hok, herr = run_handler(self, handler, row)
      b.due = false
      if hok and b.fresh and conn:txstatus() ~= "intrans" then
        -- the handler caught the error of its own statement: its work is void
        hok, herr = false, conn:ok() and "a statement of the handler failed, which aborted its transaction"
                           or "the connection was lost"
      end
      if hok then
        done[#done + 1] = msg.id
      else
        if not conn:ok() then return abort(tostring(herr), "closed") end
        if b.fresh then
          local ok
          ok, err, code = conn:script("rollback to savepoint msgbus_message; release savepoint msgbus_message")
          if not ok then return abort(err, code) end
          b.open = false
        end
        failed[row.sender] = true
        local ok
        ok, err, code = conn:run("fail", msg.id, tostring(herr), self.max_attempts)
        if not ok then return abort(err, code) end
      end
    end
  end
  -- the ids come from the database, in canonical form: safe to inline
  local ok
  ok, err, code = conn:script(#done > 0 and ("select msgbus.done_many('{%s}'); commit"):format(table.concat(done, ","))
                              or "commit")
  if not ok or conn:txstatus() ~= "idle" then
    if not conn:ok() then return nil, err or "the connection was lost at commit", code or "closed" end
    conn:exec("rollback")
    return "single", tried
  end
  return #done, tried
end

local function listen_batch(self, handler, limit)
  local b = { due = false, open = false, fresh = false, savepoints = 0 }
  self.batch = b
  local handled, tried, code = listen_batch_in(self, handler, limit, b)
  self.batch = nil
  return handled, tried, code
end

--- bus:status([opts]) -> table | nil, err
-- The facts `msgbus status --json` prints: per peer the subscription, its worker,
-- the slot and its WAL, the outbox depth and oldest unacked age; inbox depth, dead
-- letters, and `healthy` with the `problems` found. opts.max_ack_age (seconds,
-- default 60) is the age past which an unacked message is a problem.
function Bus:status(opts)
  bus_check(self)
  local max_ack_age = check_seconds(opts and opts.max_ack_age, 1, "opts.max_ack_age")
  return require("msgbus.cli").status(self, max_ack_age)
end

--- Event loops (cqueues, luv, copas): wait until bus:pollfd() is readable, or
-- bus:timeout() seconds have passed, then call bus:step(handler).

-- bus:pollfd() -> the connection's socket (an integer file descriptor)
function Bus:pollfd()
  bus_check(self)
  local conn, err, code = listen_on(self, "inbox")
  if not conn then return nil, err, code end
  return conn:socket()
end

-- bus:events() -> "r": the bus only ever waits to read
function Bus:events()
  bus_check(self)
  return "r"
end

-- An available message that listen could not claim (its sender's earlier message is
-- being handled elsewhere, or it is a reply that a wait_reply call waits for) is
-- looked at again after this many seconds, or at the next notification: not in a
-- loop, which a reply whose waiter went away would keep going for ever.
local BLOCKED_RECHECK = 1

-- Seconds to wait, from msgbus.next_due's answer (nil or false: nothing held back).
local function due_wait(due)
  if not due then return nil end
  if due <= 0 then return BLOCKED_RECHECK end
  return due
end

-- A reply that listen cannot take because a wait_reply call waits for it stays so
-- while that wait is held: ask the database to forget the waits whose session has
-- been gone for the bus's wait_grace (msgbus.forget_orphaned_waits), at most once per
-- BLOCKED_RECHECK, never inside a transaction. Returns true when it forgot one: a
-- reply may be available now. A failure (a schema from before migration 009) counts
-- as nothing forgotten; a lost connection shows at listen's next step.
local function forget_orphans(self)
  local conn = self.conn
  local now = core.now()
  if not conn or (self.forget_at and now < self.forget_at) or not conn:ok() or conn:txstatus() ~= "idle" then
    return false
  end
  self.forget_at = now + BLOCKED_RECHECK
  local rows = conn:exec("select msgbus.forget_orphaned_waits(make_interval(secs => $1::float8)) as n",
                         self.wait_grace)
  return (rows and rows[1] and rows[1].n or 0) > 0
end

-- bus:timeout() -> seconds until a held-back message (retry, delay) comes due, or nil;
-- 0 when a call read a notification the socket will not tell again (see absorb)
function Bus:timeout()
  bus_check(self)
  local rows = run(self, "next_due")
  absorb(self)
  if self.noted then return 0 end
  return due_wait(rows and rows[1] and rows[1].due)
end

local function check_handler(handler, fname)
  if type(handler) ~= "function" then
    error(("msgbus: bad argument #1 to '%s' (function expected, got %s)"):format(fname, type(handler)), 3)
  end
end

-- bus:step(handler [, opts]) -> count | nil, err, code
-- Takes what arrived on the socket and hands every message available now to
-- handler, then returns without waiting. opts.max bounds the number handled.
function Bus:step(handler, opts)
  bus_check(self)
  check_handler(handler, "step")
  local max = opts and opts.max
  local total = 0
  self.noted = nil
  while true do
    local count, err, code = self:listen(handler, { timeout = 0, max = max and max - total })
    if not count then return nil, err, code end
    total = total + count
    if max and total >= max then return total end
    -- a notification that came in with our own queries' answers is read already and
    -- will not make the socket readable again: go round once more if there is one
    local conn = self.conn
    self.unseen = nil
    local notes = conn and conn:ok() and conn:notifications()
    if not notes or #notes == 0 then
      -- what absorb dropped meanwhile came before its last claim, which found nothing
      self.noted = nil
      return total
    end
  end
end

-- Consumed rows leave dead index entries that every claim steps over (its scan starts
-- at the oldest position) until a vacuum: listen vacuums the inbox after every
-- VACUUM_EVERY messages it handled, and when the inbox runs empty after at least
-- VACUUM_IDLE of them. Not after every message: a listener fed one message at a
-- time would otherwise vacuum once per message (about 2 ms of server time each).
-- A vacuum also reads each of the inbox's indexes whole, so it takes longer the
-- bigger the backlog (0.5 ms at 1,000 messages, 3-4 ms at 100,000: a sixth of a
-- listen { batch = 50 }'s server time there): while messages keep coming, the next
-- vacuum comes after as many messages as keep vacuuming to VACUUM_SHARE of the
-- time, at least VACUUM_EVERY and at most VACUUM_MAX.
local VACUUM_EVERY = 500
local VACUUM_IDLE = 100
local VACUUM_SHARE = 0.05
local VACUUM_MAX = 20000
-- The most messages listen's opts.batch puts in one transaction: claim_batch's own
-- limit (see MAX_SUBXACTS for handlers that use the database).
local MAX_BATCH = 1000

-- Vacuum the inbox, skipping it if another listener is at it; a role that does not
-- own the table only gets a warning, which is ignored. Without parallel workers:
-- once the inbox's indexes pass min_parallel_index_scan_size, VACUUM starts
-- workers for them, and starting them took longer than the vacuum's own work (a
-- listen { batch = 50 } consumed 7,700 messages a second with them, 17,000 without).
run_vacuum = function(self)
  local conn = self.conn
  if conn and conn:ok() and conn:txstatus() == "idle" then
    local t0 = core.now()
    conn:exec(("vacuum (skip_locked, parallel 0) msgbus.%s"):format(conn:escape_identifier("to_" .. self.service)))
    local t1 = core.now()
    -- after VACUUM_EVERY or more handled since the last one: the time a message took
    -- then sets the next interval (see VACUUM_SHARE)
    local handled, since = self.consumed or 0, self.vacuumed_at
    if since and handled >= VACUUM_EVERY and t0 > since then
      local each = (t0 - since) / handled
      local n = math.ceil((t1 - t0) / (each * VACUUM_SHARE))
      self.vacuum_every = math.max(VACUUM_EVERY, math.min(VACUUM_MAX, n))
    end
    self.vacuumed_at = t1
    forget_orphans(self)
  end
  self.consumed = 0
end

--- bus:listen(handler [, opts]) -> count | nil, err, code
-- opts.max: return after that many messages handled; opts.timeout: return after that
-- many seconds with nothing to do. Without either, runs until the bus is closed.
function Bus:listen(handler, opts)
  bus_check(self)
  check_handler(handler, "listen")
  if opts ~= nil and type(opts) ~= "table" then
    error("msgbus: bad argument #2 to 'listen' (options table expected)", 2)
  end
  opts = opts or {}
  local max = opts.max
  if max ~= nil and (math.type(max) ~= "integer" or max < 1) then
    error("msgbus: bad argument #2 to 'listen' (opts.max must be an integer >= 1)", 2)
  end
  local timeout = check_timeout(opts.timeout, 2)
  local batch = opts.batch
  if batch ~= nil and (math.type(batch) ~= "integer" or batch < 1 or batch > MAX_BATCH) then
    error(("msgbus: bad argument #2 to 'listen' (opts.batch must be an integer from 1 to %d)"):format(MAX_BATCH), 2)
  end
  if self.depth > 0 then
    error("msgbus: listen cannot be called inside a transaction", 2)
  end
  local _, lerr, lcode = listen_on(self, "inbox")
  if lerr and not lost(lcode) then return nil, lerr, lcode end
  local count = 0
  local single = 0 -- messages to hand out one transaction each after a failed batch commit
  self.vacuumed_at = self.vacuumed_at or core.now()
  self.vacuum_every = self.vacuum_every or VACUUM_EVERY
  local idle_deadline = timeout and core.now() + timeout
  while not self.closed do
    -- what ended the step: "handled", "failed", "empty", or nil with err, code; and
    -- n, the messages handled in it (a batch whose handlers all failed has n = 0)
    local what, err, code, due
    local n = 0
    if batch and batch > 1 and single == 0 then
      local handled, tried
      handled, tried, code = listen_batch(self, handler, max and math.min(batch, max - count) or batch)
      if handled == "single" then
        single, what = tried, "failed"
      elseif handled and tried == 0 then
        what = "empty"
      elseif handled then
        what, n = "handled", handled
      else
        err = tried
      end
    else
      -- a run ends where listen must look up: max, the next vacuum, the end of the
      -- messages to hand out alone
      local limit = math.max(self.vacuum_every - (self.consumed or 0), 1)
      if max then limit = math.min(limit, max - count) end
      if single > 0 then limit = math.min(limit, single) end
      what, n, err, code, due = listen_once(self, handler, limit)
      single = math.max(single - n - (what == "failed" and 1 or 0), 0)
    end
    if n > 0 then
      count = count + n
      self.consumed = (self.consumed or 0) + n
      if self.consumed >= self.vacuum_every then
        run_vacuum(self)
      end
      if max and count >= max then return count end
      idle_deadline = timeout and core.now() + timeout
    end
    if what == "handled" or what == "failed" then
      idle_deadline = timeout and core.now() + timeout
      -- the notifications libpq read with the answers would pile up for as long as
      -- the inbox never runs empty (only the wait reads them): drop them. Nothing is
      -- lost: a notification is sent once its transaction committed, and listen
      -- claims again right away, after it. (One may come after the answer it was read
      -- with, in the same read of the socket, so a caller that waits on the socket
      -- next must not drop them: after an empty claim, the wait reads them.)
      absorb(self)
    elseif what == "empty" then
      single = 0
      if (self.consumed or 0) >= VACUUM_IDLE then
        run_vacuum(self)
      end
      local expired = idle_deadline and core.now() >= idle_deadline
      if due == nil and not expired then
        local rows = run(self, "next_due")
        due = rows and rows[1] and rows[1].due
      end
      -- an available message it could not take may be a reply whose waiter is gone:
      -- if a wait was forgotten, go round and claim again instead of waiting
      if not (due and due <= 0 and forget_orphans(self)) then
        if expired then return count end
        -- messages held back for a retry come due without a notification
        local wait_until = idle_deadline
        due = due_wait(due)
        if due then
          local at = core.now() + due
          if not wait_until or at < wait_until then wait_until = at end
        end
        local ok
        ok, err, code = wait_event(self, wait_until)
        if not ok and not lost(code) then return nil, err, code end
      end
    else
      if not lost(code) then return nil, err, code end
      local ok
      ok, err, code = reconnect(self, idle_deadline)
      if not ok then
        if self.closed then break end
        return nil, err, code
      end
    end
  end
  finish_close(self)
  return count
end

M.setup = require "msgbus.setup"

return M
