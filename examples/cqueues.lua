-- msgbus in a cqueues program: one coroutine handles messages as they arrive while
-- others send and do unrelated work, none of them blocking the others.
--   lua5.4 examples/cqueues.lua        (starts and removes its own clusters)
local cqueues = require "cqueues"
local msgbus = require "msgbus"
local cluster = require "msgbus.cluster"

local N = tonumber(os.getenv("EXAMPLE_MESSAGES") or "50")

local function main()
  local ca, cb = assert(cluster.start { name = "cq_a" }), assert(cluster.start { name = "cq_b" })
  assert(ca:createdb("store")); assert(cb:createdb("payments"))
  local store = { service = "store", conninfo = ca:conninfo("store") }
  local payments = { service = "payments", conninfo = cb:conninfo("payments") }
  assert(msgbus.setup.link(store, payments))
  local sender = assert(msgbus.connect(store.conninfo))
  local receiver = assert(msgbus.connect(payments.conninfo))

  local cq = cqueues.new()
  local handled, ticks = 0, 0
  cq:wrap(function()                       -- the listener: a bus is a pollable object
    while handled < N do
      cqueues.poll(receiver)               -- its pollfd(), events() and timeout()
      assert(receiver:step(function(m) handled = handled + 1; assert(m.data.i) end))
    end
  end)
  cq:wrap(function()                       -- the sender
    for i = 1, N do
      assert(sender:send("payments", "tick", { i = i }))
      cqueues.sleep(0.002)
    end
  end)
  cq:wrap(function()                       -- unrelated work, going on all along
    while handled < N do ticks = ticks + 1; cqueues.sleep(0.005) end
  end)
  assert(cq:loop(60))
  print(("cqueues: handled %d messages while the ticker ran %d times"):format(handled, ticks))
  sender:close(); receiver:close()
end

local ok, err = xpcall(main, debug.traceback)
cluster.destroy_all()
if not ok then io.stderr:write(tostring(err), "\n"); os.exit(1) end
