-- The receiving process of the benchmarks, started by bench/run.lua:
--
--   lua5.4 bench/listener.lua latency CONNINFO N
--     handles N messages; for each whose data.t > 0 (0 marks a warm-up) records
--     core.now() - data.t at the start of the handler (both ends read CLOCK_MONOTONIC,
--     which is system-wide on Linux). Prints "n s1 .. sn" (seconds).
--
--   lua5.4 bench/listener.lua batch CONNINFO MARKFILE [batch=K] B1 B2 ...
--     handles messages with a handler that does nothing, stopping at each count Bi
--     (ascending) to append "Bi time VmRSS_KiB LuaHeap_KiB LiveHeap_KiB" to MARKFILE
--     (first a line for 0 when ready; LiveHeap: the heap after a full collection, made
--     after the other two are read), flushed at once so that run.lua can read the
--     progress of a run it gives up on. With batch=K, through listen { batch = K }.
--     Prints "done" at the end.
--
-- Both modes first print "ready PID" once connected and listening.
local cluster = require "msgbus.cluster"
local core = require "msgbus.core"
local msgbus = require "msgbus"

local IDLE_LIMIT = 300 -- seconds without a message before giving up

local mode, conninfo = arg[1], arg[2]
if (mode ~= "latency" and mode ~= "batch") or not conninfo or not arg[3] or (mode == "batch" and not arg[4]) then
  io.stderr:write("usage: listener.lua latency CONNINFO N | batch CONNINFO MARKFILE [batch=K] B1 [B2 ...]\n")
  os.exit(2)
end

local function die(...)
  io.stderr:write("listener: ", table.concat({ ... }, " "), "\n")
  os.exit(1)
end

local function rss_kib()
  local f = io.open("/proc/self/status", "r")
  if not f then return 0 end
  local text = f:read("a")
  f:close()
  return tonumber(text:match("VmRSS:%s*(%d+)")) or 0
end

local bus, err = msgbus.connect(conninfo)
if not bus then die(err) end
io.stdout:write(("ready %d\n"):format(cluster.self_pid()))
io.stdout:flush()

if mode == "latency" then
  local n = math.tointeger(tonumber(arg[3])) or die("bad N")
  local lat = {}
  local got, lerr = bus:listen(function(msg)
    local t = core.now()
    local sent = msg.data.t
    if sent and sent > 0 then lat[#lat + 1] = t - sent end
  end, { max = n, timeout = IDLE_LIMIT })
  if not got then die(lerr) end
  if got < n then die(("only %d of %d messages arrived"):format(got, n)) end
  local out = { tostring(#lat) }
  for i, v in ipairs(lat) do out[i + 1] = ("%.9f"):format(v) end
  io.stdout:write(table.concat(out, " "), "\n")
else
  local marks = io.open(arg[3], "w") or die("cannot write " .. arg[3])
  local function mark(count)
    local t, rss, heap = core.now(), rss_kib(), collectgarbage("count")
    collectgarbage("collect")
    marks:write(("%d %.9f %d %.1f %.1f\n"):format(count, t, rss, heap, collectgarbage("count")))
    marks:flush()
  end
  local first, batch = 4, nil
  if arg[4]:match("^batch=") then
    batch = math.tointeger(tonumber(arg[4]:match("^batch=(.*)$"))) or die("bad " .. arg[4])
    first = 5
  end
  mark(0)
  local done = 0
  local function noop() end
  for i = first, #arg do
    local stop = math.tointeger(tonumber(arg[i])) or die("bad count " .. arg[i])
    if stop > done then
      local got, lerr = bus:listen(noop, { max = stop - done, timeout = IDLE_LIMIT, batch = batch })
      if not got then die(lerr) end
      done = done + got
      if done < stop then die(("only %d of %d messages arrived"):format(done, stop)) end
      mark(stop)
    end
  end
  marks:close()
  io.stdout:write("done\n")
end
bus:close()
