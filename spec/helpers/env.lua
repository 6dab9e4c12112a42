-- Shared test environment: real PostgreSQL clusters started once per busted run
-- (busted runs with auto-insulate off, so this module is loaded once), and fresh
-- uniquely named services on them for each test that needs some.
local cluster = require "msgbus.cluster"
local core = require "msgbus.core"
local msgbus = require "msgbus"

local env = {}

local clusters = {}
local counter = 0

-- Cluster `name` ("a", "b", "c"): each is its own server, so links between them
-- really cross servers. Started on first use.
-- Specs never unlink what they link, so one server ends up with many subscriptions,
-- each an apply worker, a walsender and a slot: room for all of them.
local LIMITS = {
  max_connections = "400", max_worker_processes = "200", max_logical_replication_workers = "160",
  max_wal_senders = "160", max_replication_slots = "160",
}

function env.cluster(name, settings)
  if not clusters[name] then
    local all = {}
    for k, v in pairs(LIMITS) do all[k] = v end
    for k, v in pairs(settings or {}) do all[k] = v end
    local c, err = cluster.start { name = name, base = os.getenv("MSGBUS_TEST_DIR"), settings = all }
    assert(c, err)
    clusters[name] = c
  end
  return clusters[name]
end

-- A new service with its own database on cluster `where` ("a" if not given), msgbus
-- installed. Returns { service = ..., conninfo = ..., cluster = ... }.
function env.service(prefix, where)
  return env.service_on(prefix, env.cluster(where or "a"))
end

-- Two (or more) services, each pair linked. `where` lists the clusters, e.g. {"a","b"};
-- by default the first three services go on "a", "b" and "c".
function env.linked(prefixes, where)
  local on = {}
  for i in ipairs(prefixes) do on[i] = env.cluster(where and where[i] or ({ "a", "b", "c" })[i]) end
  return env.linked_on(prefixes, on)
end

function env.connect(svc, opts)
  return assert(msgbus.connect(svc.conninfo, opts))
end

-- Poll fn until it returns a truthy value (no blind sleeps); nil when the deadline
-- passes.
function env.poll(fn, timeout)
  local deadline = core.now() + timeout
  local delay = 0.005
  while true do
    local v = fn()
    if v then return v end
    if core.now() > deadline then return nil end
    core.sleep(delay)
    delay = math.min(delay * 2, 0.1)
  end
end

-- env.poll, raising an error when the deadline passes.
function env.wait_until(fn, timeout, what)
  local v = env.poll(fn, timeout or 20)
  if v then return v end
  error(("timed out after %gs waiting for %s"):format(timeout or 20, what or "condition"), 2)
end

-- The rows of SQL run as the database's superuser.
function env.exec(svc, sql, ...)
  local conn = assert(core.connect(svc.conninfo))
  local rows, err = conn:exec(sql, ...)
  conn:close()
  assert(rows, err)
  return rows
end

-- One value from SQL run as the database's superuser.
function env.scalar(svc, sql, ...)
  local row = env.exec(svc, sql, ...)[1]
  if not row then return nil end
  local _, v = next(row)
  return v
end

-- How many messages (acks included) `svc` holds for `peer`: its outbox to that peer.
function env.outbox_count(svc, peer)
  return env.scalar(svc, "select coalesce(sum(msgbus.message_count(type, data)), 0)::int8 from msgbus.messages where receiver = $1",
                    peer.service)
end

-- A trigger on `svc`'s inbox that runs before msgbus's own ("a_spy" sorts before
-- "arrival"; enabled always, so the apply worker runs it too) and records each row
-- that arrives into public.<name> (`columns`, which starts empty) with the PL/pgSQL
-- statements `body`. Returns a function that removes the trigger.
function env.inbox_spy(svc, name, columns, body)
  local inbox = "msgbus.to_" .. svc.service
  env.exec(svc, ("create table if not exists public.%s (%s)"):format(name, columns))
  env.exec(svc, ("truncate public.%s"):format(name))
  env.exec(svc, ("drop trigger if exists a_spy on %s"):format(inbox))
  env.exec(svc, ("create or replace function public.%s() returns trigger language plpgsql as $$\n"
    .. "begin\n%s\nreturn new;\nend $$"):format(name, body))
  env.exec(svc, ("create trigger a_spy before insert on %s for each row execute function public.%s()"):format(inbox, name))
  env.exec(svc, ("alter table %s enable always trigger a_spy"):format(inbox))
  return function() env.exec(svc, ("drop trigger a_spy on %s"):format(inbox)) end
end

-- `bus`:listen(opts) with a handler that uses the database (it asks for its
-- transaction's id) and notes each message's data.i. Returns the sizes of the
-- transactions the messages went through, smallest first, and the data.i in the
-- order handled.
function env.listen_tx_sizes(bus, opts)
  local tx, got = {}, {}
  assert(bus:listen(function(m)
    got[#got + 1] = m.data.i
    local x = assert(bus:exec("select txid_current()::text as x"))[1].x
    tx[x] = (tx[x] or 0) + 1
  end, opts))
  local sizes = {}
  for _, n in pairs(tx) do sizes[#sizes + 1] = n end
  table.sort(sizes)
  return sizes, got
end

-- fn(c) on a new connection to `svc`, in a transaction of its own that writes as the
-- apply worker does (session_replication_role = replica): committed if fn returns a
-- true value, else rolled back. Returns fn's first two results.
local function as_apply_worker(svc, fn)
  local c = assert(core.connect(svc.conninfo))
  assert(c:exec("begin"))
  assert(c:exec("set local session_replication_role = replica"))
  local ok, err = fn(c)
  assert(c:exec(ok and "commit" or "rollback"))
  c:close()
  return ok, err
end

-- One row arriving in `svc`'s inbox from `from`, written as the apply worker writes
-- it (session_replication_role = replica), in a transaction of its own: type `mtype`,
-- `reply` a UUID or nil, `data` JSON text or nil (the column's default, {}), `id` a
-- UUID or nil (the column's default). Returns true, or nil and the error (rolled
-- back).
function env.arrive(svc, from, mtype, reply, data, id)
  return as_apply_worker(svc, function(c)
    -- (the id as a sixth parameter only when given: exec sends every argument it gets)
    local params = table.pack(from.service, svc.service, mtype, reply, data)
    if id then params[6], params.n = id, 6 end
    return c:exec(("insert into msgbus.to_%s (sender, receiver, type, reply, data, id)"
      .. " values ($1, $2, $3, $4::uuid, coalesce($5::jsonb, '{}'), %s)"):format(svc.service, id and "$6::uuid" or "default"),
      table.unpack(params, 1, params.n))
  end)
end

-- Rows from `from` arriving in `svc`'s inbox in one transaction, written as the apply
-- worker writes them: one of type `mtype` for each UUID of `replies`, in order.
function env.arrive_all(svc, from, mtype, replies)
  assert(as_apply_worker(svc, function(c)
    return c:exec(("insert into msgbus.to_%s (sender, receiver, type, reply)"
      .. " select $1, $2, $3, r::uuid from unnest($4::text[]) with ordinality u(r, n) order by n"):format(svc.service),
      from.service, svc.service, mtype, "{" .. table.concat(replies, ",") .. "}")
  end))
end

-- A new service with its own database on the cluster object `c` (env.service takes
-- a cluster's name), msgbus installed.
-- `peer`, if given, says how the other side's server reaches it (setup.link's
-- peer_conninfo): conninfo keywords with at least `host`, e.g. another address of a
-- cluster in a network namespace; the port and the database name are added.
function env.service_on(prefix, c, peer)
  counter = counter + 1
  local name = ("%s%d_%s"):format(prefix, counter, core.random_hex(2))
  assert(c:createdb(name))
  local svc = { service = name, conninfo = c:conninfo(name), cluster = c }
  if peer then
    local parts = { "port=" .. c.port, "dbname=" .. name }
    for k, v in pairs(peer) do parts[#parts + 1] = ("%s=%s"):format(k, v) end
    table.sort(parts)
    svc.peer_conninfo = table.concat(parts, " ")
  end
  assert(msgbus.setup.install(svc.conninfo, name))
  return svc
end

-- env.linked on cluster objects: service i on on[i], reached by its peers as
-- peers[i] says (see env.service_on); each pair linked.
function env.linked_on(prefixes, on, peers)
  local svcs = {}
  for i, p in ipairs(prefixes) do svcs[i] = env.service_on(p, on[i], peers and peers[i]) end
  for i = 1, #svcs do
    for j = i + 1, #svcs do
      assert(msgbus.setup.link(svcs[i], svcs[j]))
    end
  end
  return table.unpack(svcs)
end

return env
