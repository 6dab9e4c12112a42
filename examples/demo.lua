-- msgbus demo: a store and a payments service, each with its own PostgreSQL server,
-- exchanging messages: a request, its acknowledgement, its handling and the reply,
-- then latencies measured.
--
--   make demo     runs `msgbus dev up` (two linked throwaway clusters), this demo
--                 against them (MSGBUS_DEV_DIR names their folder), then `msgbus dev down`
--   lua5.4 examples/demo.lua
--                 alone (msgbus on the paths): starts and removes its own clusters
local msgbus = require "msgbus"
local cluster = require "msgbus.cluster"
local core = require "msgbus.core"

local ROUNDS = tonumber(os.getenv("DEMO_ROUNDS") or "200")

local function say(fmt, ...) io.write(fmt:format(...), "\n"); io.flush() end

local function percentile(xs, p)
  table.sort(xs)
  return xs[math.max(1, math.ceil(#xs * p))]
end

-- The services of a `msgbus dev up` folder, by name, or nil when there is none.
local function dev_services(dir)
  local f = dir and dir ~= "" and io.open(dir .. "/msgbus-dev.json", "rb")
  if not f then return nil end
  local state = msgbus.decode(f:read("a"))
  f:close()
  local by_name = {}
  for _, c in ipairs(state.clusters) do by_name[c.service] = { service = c.service, conninfo = c.conninfo } end
  assert(by_name.store and by_name.payments, dir .. ": the dev environment has no store and payments services")
  return by_name.store, by_name.payments
end

local function own_clusters()
  say("starting two PostgreSQL clusters (one per service)...")
  local ca = assert(cluster.start { name = "store" })
  local cb = assert(cluster.start { name = "payments" })
  assert(ca:createdb("store"))
  assert(cb:createdb("payments"))
  local store = { service = "store", conninfo = ca:conninfo("store") }
  local payments = { service = "payments", conninfo = cb:conninfo("payments") }
  say("  store    on port %d", ca.port)
  say("  payments on port %d", cb.port)
  say("installing msgbus and linking store <-> payments:")
  assert(msgbus.setup.install(store.conninfo, "store"))
  assert(msgbus.setup.install(payments.conninfo, "payments"))
  assert(msgbus.setup.link(store, payments, { log = function(line) say("  %s", line) end }))
  return store, payments
end

local function main()
  local store, payments = dev_services(os.getenv("MSGBUS_DEV_DIR"))
  if store then
    say("using the services of 'msgbus dev up' in %s", os.getenv("MSGBUS_DEV_DIR"))
  else
    store, payments = own_clusters()
  end

  local sbus = assert(msgbus.connect(store.conninfo))
  local pbus = assert(msgbus.connect(payments.conninfo))

  say("\nstore: creates an order and sends 'charge' in the same transaction")
  assert(sbus:exec("create table if not exists orders (id serial primary key, usd int, paid bool default false)"))
  local id = assert(sbus:transaction(function()
    local order = assert(sbus:exec("insert into orders (usd) values ($1) returning id", 100))[1]
    return assert(sbus:send("payments", "charge", { order = order.id, usd = 100, user = 123 },
                            { await_reply = true }))
  end))
  say("  sent %s", id)
  assert(sbus:wait_ack(id, 10))
  say("store: payments acknowledged %s (it is in payments' database now)", id)

  say("payments: handles the charge and replies, in one transaction")
  assert(pbus:exec("create table if not exists charges (msg uuid primary key, usd int, user_id bigint)"))
  pbus:listen(function(m)
    say("  got %s from %s: %s", m.type, m.sender, msgbus.encode(m.data))
    assert(pbus:exec("insert into charges values ($1, $2, $3)", m.id, m.data.usd, m.data.user))
    assert(pbus:reply(m, "charged", { order = m.data.order, ok = true }))
  end, { max = 1, timeout = 10 })

  local r = assert(sbus:wait_reply(id, 10))
  say("store: reply %s: %s", r.type, msgbus.encode(r.data))
  assert(sbus:exec("update orders set paid = true where id = $1", r.data.order))

  say("\nmeasuring %d round trips (one message at a time)...", ROUNDS)
  local acks, handled = {}, {}
  for i = 1, ROUNDS do
    local t0 = core.now()
    local mid = assert(sbus:send("payments", "ping", { i = i }))
    assert(sbus:wait_ack(mid, 10))
    acks[i] = core.now() - t0
  end
  assert(pbus:listen(function() end, { max = ROUNDS, timeout = 10 }) == ROUNDS)
  for i = 1, ROUNDS do
    local t0 = core.now()
    assert(sbus:send("payments", "ping", { i = i }))
    pbus:listen(function() handled[i] = core.now() - t0 end, { max = 1, timeout = 10 })
  end
  say("  send -> wait_ack   p50 %.2f ms  p99 %.2f ms", percentile(acks, 0.5) * 1e3, percentile(acks, 0.99) * 1e3)
  say("  send -> handler    p50 %.2f ms  p99 %.2f ms", percentile(handled, 0.5) * 1e3, percentile(handled, 0.99) * 1e3)

  local left = sbus:exec("select count(*)::int8 as n from msgbus.messages")[1].n
    + pbus:exec("select count(*)::int8 as n from msgbus.messages")[1].n
  say("  messages left in any outbox or inbox: %d", left)
  sbus:close()
  pbus:close()
end

local ok, err = xpcall(main, debug.traceback)
cluster.destroy_all()
if not ok then
  io.stderr:write("demo failed: ", tostring(err), "\n")
  os.exit(1)
end
say("\ndone")
