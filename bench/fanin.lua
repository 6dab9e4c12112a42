-- The processes of figure 7 (fan-in), started by bench/run.lua: one OS process per
-- sending service and one for the receiver's listener, so that the senders really run
-- at the same time (each has its own connection and its own CPU time).
--
--   lua5.4 bench/fanin.lua send CONNINFO RECEIVER N GOFILE
--     sends N messages to RECEIVER, one transaction each, then waits for the ack of
--     the last one (acks are applied in the order the sender committed, so that is all
--     of them acked). Prints "first_commit last_commit acked" (core.now() seconds).
--
--   lua5.4 bench/fanin.lua listen CONNINFO N BATCH GOFILE
--     handles N messages with a no-op handler and listen { batch = BATCH }; prints
--     the core.now() at which the last batch committed.
--
-- Both print "ready PID" once connected. A sender starts sending when GOFILE exists,
-- so that run.lua can start several at once; the listener listens at once. After
-- printing its figures each waits until GOFILE is gone again before it closes its
-- connection and prints "done", so that run.lua can read the CPU time of the server
-- processes serving it while they still exist.
local cluster = require "msgbus.cluster"
local core = require "msgbus.core"
local msgbus = require "msgbus"

local WAIT_LIMIT = 300 -- seconds: the longest wait for a start, an ack or a message

local mode, conninfo = arg[1], arg[2]
local usage = "usage: fanin.lua send CONNINFO RECEIVER N GOFILE | listen CONNINFO N BATCH GOFILE\n"
if (mode ~= "send" and mode ~= "listen") or not arg[5] then
  io.stderr:write(usage)
  os.exit(2)
end

local function die(...)
  io.stderr:write("fanin ", mode, ": ", table.concat({ ... }, " "), "\n")
  os.exit(1)
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

-- Polls for `path` to exist (or not); 1 ms slices before the start, since a late
-- start would count, coarser ones at the end, where nothing is timed.
local function await_file(path, present, slice)
  local deadline = core.now() + WAIT_LIMIT
  while exists(path) ~= present do
    if core.now() > deadline then die(("%s did not %s within %d s"):format(path, present and "appear" or "go", WAIT_LIMIT)) end
    core.sleep(slice)
  end
end

local bus, err = msgbus.connect(conninfo)
if not bus then die(err) end
io.stdout:write(("ready %d\n"):format(cluster.self_pid()))
io.stdout:flush()

local gofile
if mode == "send" then
  local receiver = arg[3]
  local n = math.tointeger(tonumber(arg[4])) or die("bad N " .. arg[4])
  gofile = arg[5]
  await_file(gofile, true, 0.001)
  local first, last, id
  for i = 1, n do
    local serr
    id, serr = bus:send(receiver, "bench.fanin", { n = i })
    if not id then die(serr) end
    if i == 1 then first = core.now() end
  end
  last = core.now()
  local ok, aerr = bus:wait_ack(id, WAIT_LIMIT)
  if not ok then die(aerr) end
  io.stdout:write(("%.9f %.9f %.9f\n"):format(first, last, core.now()))
else
  local n = math.tointeger(tonumber(arg[3])) or die("bad N " .. arg[3])
  local batch = math.tointeger(tonumber(arg[4])) or die("bad BATCH " .. arg[4])
  gofile = arg[5]
  local got, lerr = bus:listen(function() end, { max = n, batch = batch, timeout = WAIT_LIMIT })
  if not got then die(lerr) end
  if got < n then die(("only %d of %d messages arrived"):format(got, n)) end
  io.stdout:write(("%.9f\n"):format(core.now()))
end
io.stdout:flush()
await_file(gofile, false, 0.02)
bus:close()
io.stdout:write("done\n")
