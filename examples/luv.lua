-- msgbus in a luv (libuv) program: a poll handle on the bus's socket runs step()
-- when messages arrive, a timer sends, another does unrelated work.
--   lua5.4 examples/luv.lua            (starts and removes its own clusters)
local uv = require "luv"
local msgbus = require "msgbus"
local cluster = require "msgbus.cluster"

local N = tonumber(os.getenv("EXAMPLE_MESSAGES") or "50")

local function main()
  local ca, cb = assert(cluster.start { name = "uv_a" }), assert(cluster.start { name = "uv_b" })
  assert(ca:createdb("store")); assert(cb:createdb("payments"))
  local store = { service = "store", conninfo = ca:conninfo("store") }
  local payments = { service = "payments", conninfo = cb:conninfo("payments") }
  assert(msgbus.setup.link(store, payments))
  local sender = assert(msgbus.connect(store.conninfo))
  local receiver = assert(msgbus.connect(payments.conninfo))

  local handled, ticks, sent = 0, 0, 0
  local poll = uv.new_poll(assert(receiver:pollfd()))
  local ticker, send_timer, due = uv.new_timer(), uv.new_timer(), uv.new_timer()
  local function stop_all()
    poll:stop(); ticker:stop(); send_timer:stop(); due:stop()
  end
  local function step()
    assert(receiver:step(function(m) handled = handled + 1; assert(m.data.i) end))
    if handled >= N then return stop_all() end
    -- held-back messages (retries, delays) come due without a notification
    local t = receiver:timeout()
    if t then due:start(math.ceil(t * 1000), 0, step) end
  end
  poll:start("r", step)
  send_timer:start(0, 2, function()
    sent = sent + 1
    assert(sender:send("payments", "tick", { i = sent }))
    if sent >= N then send_timer:stop() end
  end)
  ticker:start(0, 5, function() ticks = ticks + 1 end)
  uv.run()
  print(("luv: handled %d messages while the ticker ran %d times"):format(handled, ticks))
  sender:close(); receiver:close()
end

local ok, err = xpcall(main, debug.traceback)
cluster.destroy_all()
if not ok then io.stderr:write(tostring(err), "\n"); os.exit(1) end
