-- msgbus benchmarks: every msgbus figure next to a baseline measured in the same run
-- on the same two throwaway clusters. See bench/README.md.
--
--   lua5.4 bench/run.lua          (BENCH_SCALE=n multiplies the sizes; default 1)
--
-- Progress goes to stderr; the table (and the details under it) to stdout.
local script_dir = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".")
local root = script_dir .. "/.."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local cluster = require "msgbus.cluster"
local core = require "msgbus.core"
local msgbus = require "msgbus"
local luasql_ok, luasql = pcall(require, "luasql.postgres")

local T_START = core.now()
local LUA = arg[-1] or "lua5.4"

---------------------------------------------------------------------------
-- Sizes
---------------------------------------------------------------------------

local SCALE = tonumber(os.getenv("BENCH_SCALE") or "1")
if not SCALE or SCALE <= 0 then
  io.stderr:write("bench: BENCH_SCALE must be a positive number\n")
  os.exit(2)
end
local function scaled(n, min)
  return math.max(min or 1, math.floor(n * SCALE + 0.5))
end

local N = {
  latency = scaled(1000, 100),   -- one at a time, each waited for
  warm = 20,                     -- warm-up messages before each latency run (not counted)
  sends = scaled(2000, 100),     -- single-message transactions
  consume = scaled(5000, 100),   -- pre-filled inbox
  big = scaled(100000, 2000),    -- one transaction
  mem_small = scaled(10000, 100), -- listener RSS checkpoint (the other is `big`)
  fanin = scaled(3000, 100),     -- per sending service, single-message transactions
}
N.small = math.min(1000, N.big)  -- the small backlog
local BATCH = 50                 -- listen's opts.batch in figures 3, 5, 4's second row, 6 at BENCH_MEMORY, and 7
local WIDE = 1000                -- listen's opts.batch in figure 3's last row (a no-op handler has the whole batch)
local MANY = 10000               -- messages per bus:send_many call in figures 3 and 5
N.window = math.min(500, N.small - 1)
if N.mem_small >= N.big then N.mem_small = math.floor(N.big / 10) end

-- Figure 7: the sending services (each its own database on cluster a), and how many
-- rounds of "each alone, then all at once" (the second round in the opposite order)
-- share N.fanin messages per sender.
local FANIN = { "fan1", "fan2", "fan3" }
local FANIN_ROUNDS = 2

-- BENCH_MEMORY=n: figure 6 from a listener of its own that handles n messages (not
-- scaled), fed in transactions of MEMORY_TX and handled with listen { batch = BATCH },
-- as the last phase; its allowance of MEMORY_PER_MSG s a message is added to the budget.
local MEMORY = os.getenv("BENCH_MEMORY")
if MEMORY then
  MEMORY = math.tointeger(tonumber(MEMORY))
  if not MEMORY or MEMORY < 20000 then
    io.stderr:write("bench: BENCH_MEMORY must be a whole number of messages, at least 20000\n")
    os.exit(2)
  end
end
local MEMORY_TX = 10000
local MEMORY_PER_MSG = 2e-3
local MEMORY_ALLOWANCE = MEMORY and MEMORY * MEMORY_PER_MSG or 0

-- The big batch gives up (and says how far it got) when the run would pass this; with
-- BENCH_MEMORY it must leave the memory phase its allowance, and that phase gives up
-- at the end of the budget.
-- (300 s was the budget of figures 1 to 6; figure 7 takes about two minutes more.)
local BUDGET = tonumber(os.getenv("BENCH_BUDGET") or "") or 420 * math.max(1, SCALE) + MEMORY_ALLOWANCE
local BUDGET_END = T_START + BUDGET - 15  -- leaves time to stop the clusters and report
local BATCHES_END = BUDGET_END - MEMORY_ALLOWANCE

-- An ack that has not come after this long (seconds) for a single message is lost;
-- they come in milliseconds.
local LOST_AFTER = 10

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

local q = cluster.shell_quote
local children = {}  -- pids of the listener processes we started, for cleanup on error

local function log(fmt, ...)
  io.stderr:write(("[%6.1fs] "):format(core.now() - T_START), fmt:format(...), "\n")
end

local function numbers(line)
  local t = {}
  for w in (line or ""):gmatch("%S+") do t[#t + 1] = tonumber(w) end
  return t
end

local function pct(sorted, p)
  if #sorted == 0 then return 0 / 0 end
  return sorted[math.max(1, math.ceil(p * #sorted))]
end

local function check(v, err, ...)
  if not v then error(tostring(err), 2) end
  return v, err, ...
end

-- Run a command, return its stdout; raise with its stderr when it fails.
local function sh(cmd)
  local errfile = os.tmpname()
  local p = check(io.popen(cmd .. " 2>" .. q(errfile), "r"))
  local out = p:read("a")
  local ok = p:close()
  local ef = io.open(errfile, "r")
  local err = ef and ef:read("a") or ""
  if ef then ef:close() end
  os.remove(errfile)
  if not ok then error(("command failed: %s\n%s%s"):format(cmd, out, err), 2) end
  return out
end

-- A background process whose first line is "ready PID".
local function spawn(cmd)
  local p = check(io.popen(cmd, "r"))
  local line = p:read("l")
  local pid = line and tonumber(line:match("^ready (%d+)"))
  if not pid then
    p:close()
    error("background process did not start: " .. cmd .. " (said " .. tostring(line) .. ")", 2)
  end
  children[pid] = true
  return { p = p, pid = pid }
end

local function finish(child)
  local line = child.p:read("l")
  local ok = child.p:close()
  children[child.pid] = nil
  if not ok or not line then error("background process failed (see its message above)", 2) end
  return line
end

local function rss_mib(kib) return kib / 1024 end

---------------------------------------------------------------------------
-- The clusters, the services, the baseline's databases
---------------------------------------------------------------------------

local raw_bin, A, B, store, payments, rawsend, rawrecv, tmpdir

local function build_raw()
  local dir = sh("mktemp -d " .. q((os.getenv("TMPDIR") or "/tmp") .. "/msgbus-bench.XXXXXX")):gsub("%s+$", "")
  raw_bin = dir .. "/raw"
  local inc = sh("pg_config --includedir"):gsub("%s+$", "")
  sh(("cc -O2 -Wall -Wextra -Werror -I%s %s -lpq -o %s"):format(q(inc), q(script_dir .. "/raw.c"), q(raw_bin)))
  return dir
end

local function raw(...)
  local parts = { q(raw_bin) }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(tostring(a)) end
  return numbers(sh(table.concat(parts, " ")))
end

local function raw_spawn(...)
  local parts = { "exec", q(raw_bin) }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(tostring(a)) end
  return spawn(table.concat(parts, " "))
end

local function lua_spawn(file, mode, conninfo, ...)
  local parts = { "exec", "env", "LUA_PATH=" .. q(package.path), "LUA_CPATH=" .. q(package.cpath), q(LUA),
                  q(script_dir .. "/" .. file), mode, q(conninfo) }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(tostring(a)) end
  return spawn(table.concat(parts, " "))
end

local function listener_spawn(mode, conninfo, ...) return lua_spawn("listener.lua", mode, conninfo, ...) end
local function fanin_spawn(mode, conninfo, ...) return lua_spawn("fanin.lua", mode, conninfo, ...) end

-- An administrative connection (superuser) to one database.
local admin = {}
local function adm(ci)
  if not admin[ci] or not admin[ci]:ok() then admin[ci] = check(core.connect(ci)) end
  return admin[ci]
end
local function sql(ci, text, ...) return check(adm(ci):exec(text, ...)) end
local function script(ci, text) return check(adm(ci):script(text)) end

local function setup()
  log("starting clusters a and b")
  -- track_functions: per-function times of the triggers for the details (msgbus's
  -- and the baseline's are both PL/pgSQL, so both pay the same small cost)
  local settings = { track_functions = "pl" }
  A = check(cluster.start { name = "bench_a", settings = settings })
  B = check(cluster.start { name = "bench_b", settings = settings })
  for _, x in ipairs { { A, "store" }, { B, "payments" }, { A, "rawsend" }, { B, "rawrecv" } } do
    check(x[1]:createdb(x[2]))
  end
  store = { service = "store", conninfo = A:conninfo("store") }
  payments = { service = "payments", conninfo = B:conninfo("payments") }
  rawsend, rawrecv = A:conninfo("rawsend"), B:conninfo("rawrecv")
  log("linking store (a) and payments (b)")
  check(msgbus.setup.link(store, payments))
  log("baseline: tables, publications and subscriptions in rawsend (a) / rawrecv (b)")
  raw("setup", rawsend, rawrecv)
end

---------------------------------------------------------------------------
-- Keeping phases apart (none of this is timed)
---------------------------------------------------------------------------

local sbus, rbus  -- the store's and the payments' bus

-- Where a message that was not acknowledged in time is, for the error message.
local function diagnose(id)
  local out = {}
  local function add(what, ci, text, ...)
    local rows, err = adm(ci):exec(text, ...)
    local lines = {}
    for _, r in ipairs(rows or {}) do
      local cells = {}
      for key, v in pairs(r) do cells[#cells + 1] = key .. "=" .. tostring(v) end
      table.sort(cells)
      lines[#lines + 1] = "    " .. table.concat(cells, " ")
    end
    out[#out + 1] = ("  %s: %s\n%s"):format(what, rows and (#rows .. " row(s)") or tostring(err), table.concat(lines, "\n"))
  end
  add("in the store's outbox", store.conninfo, "select sent_at::text from msgbus.to_payments where id = $1::uuid", id)
  add("seen by payments", payments.conninfo, "select received_at::text from msgbus.seen where id = $1::uuid", id)
  add("in payments' inbox", payments.conninfo, "select pos, received_at::text from msgbus.to_payments where id = $1::uuid", id)
  for _, x in ipairs { { "store", store.conninfo }, { "payments", payments.conninfo } } do
    add(x[1] .. " slots", x[2], [[select slot_name, active, confirmed_flush_lsn::text, pg_current_wal_lsn()::text as wal
                                   from pg_replication_slots where database = current_database()]])
    add(x[1] .. " subscription", x[2], [[select subname, pid, received_lsn::text, latest_end_lsn::text
                                          from pg_stat_subscription]])
  end
  return table.concat(out, "\n")
end

local sent = 0  -- messages sent through msgbus by this run
local function send(...)
  local id, err = sbus:send(...)
  if not id then error(err, 2) end
  sent = sent + 1
  return id
end

local lost = {}  -- { phase = ..., id = ... } of messages whose ack never took them out of the outbox
local phase_name = "setup"

-- Waits for the ack of `id`. True when it came; false when the message reached the
-- receiver (it is in msgbus.seen there) but is still in the sender's outbox after
-- `timeout`: an ack that got lost. Anything else raises, with where the message is.
local function await_ack(id, timeout)
  local ok, err, code = sbus:wait_ack(id, timeout)
  if ok then return true end
  if code == "timeout" and sql(payments.conninfo, "select 1 as x from msgbus.seen where id = $1::uuid", id)[1] then
    return false
  end
  error(("%s\n%s"):format(err, diagnose(id)))
end

-- Empty the inboxes and let vacuum remove what earlier phases left dead, so that no
-- phase pays for the one before it. Every phase waited for its last ack, and acks are
-- applied in order, so whatever is still in the store's outbox lost its ack: count it
-- (the report shows it) and remove it, or every later phase would trip over it.
local function reap()
  -- (a pack reached payments if its first message did)
  for _, r in ipairs(sql(store.conninfo, [[select id::text as id, case when type = 'msgbus.pack'
                                             then data -> 'ids' ->> 0 else id::text end as probe
                                             from msgbus.to_payments]])) do
    if not sql(payments.conninfo, "select 1 as x from msgbus.seen where id = $1::uuid", r.probe)[1] then
      error(("message %s is still in the outbox and never reached payments\n%s"):format(r.id, diagnose(r.id)))
    end
    lost[#lost + 1] = { phase = phase_name, id = r.id }
    sql(store.conninfo, "delete from msgbus.to_payments where id = $1::uuid", r.id)
  end
end

local function quiet(next_phase)
  reap()
  phase_name = next_phase or phase_name
  sql(payments.conninfo, "delete from msgbus.inbox")
  sql(store.conninfo, "delete from msgbus.inbox")
  sql(rawrecv, "truncate public.raw_out, public.plain_out, public.ex_out")
  sql(rawsend, "truncate public.plain_out")
  for _, ci in ipairs { store.conninfo, payments.conninfo, rawsend, rawrecv } do script(ci, "vacuum") end
end

---------------------------------------------------------------------------
-- The figures
---------------------------------------------------------------------------

local R = {}  -- results, filled by the phases

-- CPU accounting (figures 1, 2 and 7)
local CLK_TCK = 100           -- clock ticks a second of /proc/*/stat (getconf CLK_TCK at start)

-- A process's CPU time (utime + stime) and its time spent runnable, waiting for a CPU
-- (schedstat), in seconds; nil once it is gone.
local function proc_cpu(pid)
  local f = cluster.proc_stat(pid)
  if not f then return nil end
  local sched = numbers(cluster.read_file("/proc/" .. pid .. "/schedstat"))
  return (tonumber(f[12]) + tonumber(f[13])) / CLK_TCK, (sched[2] or 0) / 1e9
end

-- What a server process does, from the title PostgreSQL gives it.
local function server_kind(pid)
  local title = (cluster.read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
  if title:find("logical replication worker", 1, true) or title:find("logical replication apply worker", 1, true) then
    return "apply workers"
  elseif title:find("walsender", 1, true) then
    return "walsenders"
  elseif title:find("%(%d+%)") then  -- host(port): a client's session
    return "backends"
  end
  return "background"  -- WAL writer, checkpointer, autovacuum, launchers
end

-- CPU seconds of every server process of both clusters (named by cluster and kind,
-- or by `roles[pid]`), of our child processes (named by `roles[pid]`), and of the
-- whole machine.
local function cpu_snapshot(roles)
  local s = { t = core.now(), procs = {} }
  for _, c in ipairs { { A, "a" }, { B, "b" } } do
    local pm = tonumber((cluster.read_file(c[1].datadir .. "/postmaster.pid") or ""):match("^%s*(%d+)"))
    for pid in sh("pgrep -P " .. math.tointeger(pm)):gmatch("%d+") do
      local cpu, wait = proc_cpu(pid)
      pid = tonumber(pid)
      if cpu then s.procs[pid] = { who = roles[pid] or c[2] .. " " .. server_kind(pid), cpu = cpu, wait = wait } end
    end
    -- processes that ended in between (the raw client's session): the postmaster's
    -- count of its reaped children's CPU (cutime + cstime)
    local f = cluster.proc_stat(math.tointeger(pm))
    if f then
      s.procs["ended " .. c[2]] = { who = c[2] .. " ended processes", cpu = (tonumber(f[14]) + tonumber(f[15])) / CLK_TCK, wait = 0 }
    end
  end
  for pid, role in pairs(roles) do
    local cpu, wait = proc_cpu(pid)
    if cpu then s.procs[pid] = { who = role, cpu = cpu, wait = wait } end
  end
  -- cpu  user nice system idle iowait irq softirq steal ...
  local v = numbers((cluster.read_file("/proc/stat") or ""):match("^cpu%s+([^\n]*)"))
  s.busy = (v[1] + v[2] + v[3] + v[6] + v[7] + (v[8] or 0)) / CLK_TCK
  s.iowait = v[5] / CLK_TCK
  return s
end

-- An empty account for cpu_add (n: messages, for the caller to count).
local function cpu_acc()
  return { wall = 0, who = {}, wait = {}, busiest = 0, busy = 0, iowait = 0, n = 0 }
end

-- Adds the CPU used and the time spent waiting for a CPU between two snapshots to
-- `into` (kinds summed, and the busiest single apply worker on b as a share of one core).
local function cpu_add(into, before, after)
  local wall = after.t - before.t
  into.wall = into.wall + wall
  for pid, p in pairs(after.procs) do
    local b = before.procs[pid]
    local same = b and b.who == p.who
    local used = p.cpu - (same and b.cpu or 0)
    into.who[p.who] = (into.who[p.who] or 0) + used
    into.wait[p.who] = (into.wait[p.who] or 0) + p.wait - (same and b.wait or 0)
    if p.who == "b apply workers" then into.busiest = math.max(into.busiest, used / wall) end
  end
  into.busy = into.busy + after.busy - before.busy
  into.iowait = into.iowait + after.iowait - before.iowait
end


-- 1. Latency, one message at a time.
local ROUNDS = 5  -- figures 1 and 2 alternate msgbus and baseline in this many blocks

-- Appends the latencies of n messages sent one at a time (after `warm` uncounted ones)
-- to `into`; a lost ack counts as an infinite latency.
local function msgbus_latency(n, warm, into)
  for i = 1 - warm, n do
    local t0 = core.now()
    local id = send("payments", "bench", { t = i > 0 and t0 or 0 })
    local acked = await_ack(id, LOST_AFTER)
    if i > 0 then into[#into + 1] = acked and core.now() - t0 or math.huge end
  end
end

local function append_samples(into, line)
  local v = numbers(line)
  for i = 2, #v do into[#into + 1] = v[i] end
end

local function summary(v)
  table.sort(v)
  return { p50 = pct(v, 0.5), p99 = pct(v, 0.99), n = #v }
end

-- 1. Latency, one message at a time; msgbus and the baseline take turns in blocks so
-- that both see the same machine.
local function phase_latency()
  local b, warm = math.max(1, N.latency // ROUNDS), N.warm
  local m, mh, r, rh = {}, {}, {}, {}
  local m0, r0 = {}, {}
  R.cpu_lat = { m = cpu_acc(), r = cpu_acc() }
  for round = 1, ROUNDS do
    log("1. latency, round %d of %d: %d messages one at a time (+%d warm-up), msgbus then baseline",
      round, ROUNDS, b, warm)
    quiet("1. latency")
    local l = listener_spawn("latency", payments.conninfo, b + warm)
    msgbus_latency(b, warm, m)
    append_samples(mh, finish(l))
    quiet()
    local rl = raw_spawn("listen", b + warm, rawrecv)
    append_samples(r, sh(("%s latency %d %d %s"):format(q(raw_bin), b, warm, q(rawsend))))
    append_samples(rh, finish(rl))
    -- the same without anything consuming on the receiving side, with the CPU every
    -- server process used (the chain of processes a message and its ack pass through)
    quiet("1. latency, no listener")
    local c0 = cpu_snapshot({})
    msgbus_latency(b, warm, m0)
    cpu_add(R.cpu_lat.m, c0, cpu_snapshot({}))
    R.cpu_lat.m.n = R.cpu_lat.m.n + b + warm
    quiet()
    c0 = cpu_snapshot({})
    append_samples(r0, sh(("%s latency %d %d %s"):format(q(raw_bin), b, warm, q(rawsend))))
    cpu_add(R.cpu_lat.r, c0, cpu_snapshot({}))
    R.cpu_lat.r.n = R.cpu_lat.r.n + b + warm
  end
  R.lat, R.raw_lat = summary(m), summary(r)
  R.lat_h, R.raw_lat_h = summary(mh), summary(rh)
  R.lat_nol, R.raw_lat_nol = summary(m0), summary(r0)
end

-- luasql for figure 2: a connection to the baseline's sending database, or nil when
-- luasql.postgres is not loadable; and n INSERTs through it, a simple query each,
-- timed, with the id of the last.
local function luasql_open()
  if not luasql_ok then return nil end
  local env = luasql.postgres()
  return env, check(env:connect(rawsend))
end

local function luasql_inserts(conn, n)
  local t0, id = core.now(), nil
  for i = 1, n do
    local cur = check(conn:execute(
      ("insert into public.raw_out (type, data) values ('bench', '{\"n\": %d}') returning id"):format(i)))
    id = cur:fetch()
    cur:close()
  end
  return core.now() - t0, id
end

-- 2. Single-message sends, one transaction each, in turns.
local function phase_sends()
  local b = math.max(1, N.sends // ROUNDS)
  local env, conn = luasql_open()
  local t_m, t_r, t_l, t_x = 0, 0, 0, 0
  R.cpu_sends = { m = cpu_acc(), r = cpu_acc(), x = cpu_acc() }
  -- Nothing listens for the store's acks while its sends are timed, as nothing
  -- listens for the baseline's while it inserts: a bus that has waited for an ack
  -- listens for them, and every ack of the service then costs its session a wake-up
  -- and a message. The sends go through a bus that only sends; the bench's own bus,
  -- which has waited, is closed, and each round's last ack is awaited after the
  -- timed sends on a bus of its own (the baseline's session waits for its last ack
  -- the same way, once its inserts are done).
  local xbus = check(msgbus.connect(store.conninfo))
  sbus:close()
  for round = 1, ROUNDS do
    log("2. sends, round %d of %d: %d each through bus:send, libpq, libpq exactly-once, luasql", round, ROUNDS, b)
    quiet("2. sends")
    local last
    local c0 = cpu_snapshot({})
    local t0 = core.now()
    for i = 1, b do last = check(xbus:send("payments", "bench", { n = i })) end
    t_m = t_m + core.now() - t0
    sent = sent + b
    sbus = check(msgbus.connect(store.conninfo))
    await_ack(last, 300)  -- untimed: let replication catch up
    sbus:close()
    cpu_add(R.cpu_sends.m, c0, cpu_snapshot({}))
    R.cpu_sends.m.n = R.cpu_sends.m.n + b

    quiet()
    c0 = cpu_snapshot({})
    t_r = t_r + raw("inserts", b, rawsend)[1]
    cpu_add(R.cpu_sends.r, c0, cpu_snapshot({}))
    R.cpu_sends.r.n = R.cpu_sends.r.n + b

    quiet()
    c0 = cpu_snapshot({})
    t_x = t_x + raw("inserts", b, rawsend, "exact")[1]
    cpu_add(R.cpu_sends.x, c0, cpu_snapshot({}))
    R.cpu_sends.x.n = R.cpu_sends.x.n + b

    if conn then
      quiet()
      local dt, id = luasql_inserts(conn, b)
      t_l = t_l + dt
      local deadline = core.now() + 300
      while not sql(rawsend, "select 1 as x from public.raw_ack where id = $1::uuid", id)[1] do
        if core.now() > deadline then error("luasql sends: no ack after 300 s") end
        core.sleep(0.01)
      end
    end
  end
  xbus:close()
  sbus = check(msgbus.connect(store.conninfo))
  R.sends, R.raw_sends, R.exact_sends = b * ROUNDS / t_m, b * ROUNDS / t_r, b * ROUNDS / t_x
  if conn then
    conn:close()
    env:close()
    R.luasql_sends = b * ROUNDS / t_l
  else
    R.luasql_sends = "n/a (luasql.postgres not loadable: " .. tostring(luasql):match("^[^\n]*") .. ")"
  end
end

-- Figure 2 again with replication paused: the subscriptions that bring the store's
-- messages to payments and the baseline's rows to rawrecv are disabled while the
-- sends are timed, so that no walsender, apply worker or ack shares the machine with
-- the sending session: what a send costs the sender itself (its statement, its
-- commit and fsync, the client), for msgbus, prepared INSERTs over libpq and luasql.
-- Nothing is lost: the slots keep the WAL, and once the subscriptions are enabled
-- again every message arrives and is acked before the next phase (untimed).

-- the subscriptions that bring the store's messages and the baseline's rows (both on b)
local function paused_subs()
  return { { payments.conninfo, "msgbus_store_to_payments" }, { rawrecv, "raw_to_recv" } }
end

local function set_subscriptions(on)
  local names = {}
  for _, x in ipairs(paused_subs()) do
    sql(x[1], ("alter subscription %s %s"):format(x[2], on and "enable" or "disable"))
    names[#names + 1] = x[2]
  end
  if on then return end
  -- a disabled subscription's worker exits soon after (and with it the walsender)
  local deadline = core.now() + 30
  while sql(payments.conninfo, "select 1 as x from pg_stat_subscription where subname = any($1::text[]) and pid is not null",
            "{" .. table.concat(names, ",") .. "}")[1] do
    if core.now() > deadline then error("2. sends with replication paused: the subscriptions' workers did not stop in 30 s") end
    core.sleep(0.05)
  end
end

local function raw_acks()
  return tonumber(sql(rawsend, "select count(*) as n from public.raw_ack")[1].n)
end

local function phase_sends_paused()
  local b = math.max(1, N.sends // ROUNDS)
  local env, conn = luasql_open()
  quiet("2. sends, replication paused")
  local t_m, t_r, t_l = 0, 0, 0
  local acks0, raw_sent, last = raw_acks(), 0, nil
  local pbus = check(msgbus.connect(store.conninfo))  -- a bus that only sends, as in figure 2
  set_subscriptions(false)
  local ok, err = xpcall(function()
    for round = 1, ROUNDS do
      log("2. sends with replication paused, round %d of %d: %d each through bus:send, libpq, luasql", round, ROUNDS, b)
      local t0 = core.now()
      for i = 1, b do last = check(pbus:send("payments", "bench", { n = i })) end
      t_m = t_m + core.now() - t0
      sent = sent + b
      t_r = t_r + raw("inserts", b, rawsend, "paused")[1]
      raw_sent = raw_sent + b
      if conn then
        t_l = t_l + luasql_inserts(conn, b)
        raw_sent = raw_sent + b
      end
    end
  end, debug.traceback)
  pbus:close()
  set_subscriptions(true)
  if not ok then error(err, 0) end
  -- untimed: every message arrives and is acked before the next phase
  log("2. sends with replication paused: catching up")
  await_ack(last, 300)
  local deadline = core.now() + 300
  while raw_acks() < acks0 + raw_sent do
    if core.now() > deadline then error("2. sends with replication paused: the baseline's acks did not come in 300 s") end
    core.sleep(0.05)
  end
  R.p_sends, R.p_raw_sends = b * ROUNDS / t_m, b * ROUNDS / t_r
  if conn then
    conn:close()
    env:close()
    R.p_luasql_sends = b * ROUNDS / t_l
  else
    R.p_luasql_sends = R.luasql_sends
  end
end

-- PL/pgSQL function counters of all four databases (track_functions = pl).
local function fn_snapshot()
  local s = {}
  for side, ci in pairs { store = store.conninfo, payments = payments.conninfo, rawsend = rawsend, rawrecv = rawrecv } do
    s[side] = {}
    for _, r in ipairs(sql(ci, [[select schemaname || '.' || funcname as name, calls::int8 as calls, total_time
                                   from pg_stat_user_functions]])) do
      s[side][r.name] = r
    end
  end
  return s
end

-- The same after the apply workers flushed theirs: they do so at a commit at least a
-- second after their previous flush, so make one message go each way in both pairs.
local function fn_settled()
  core.sleep(1.1)
  check(rbus:exec("select 1"))  -- an idle backend keeps its last second's counters until its next statement
  await_ack(send("payments", "bench.flush", {}), LOST_AFTER)
  raw("inserts", 1, rawsend)
  local s = fn_snapshot()
  for _ = 1, 10 do
    core.sleep(1.2)
    local s2 = fn_snapshot()
    local same = true
    for side, t in pairs(s2) do
      for name, r in pairs(t) do
        if not s[side][name] or s[side][name].calls ~= r.calls then same = false end
      end
    end
    if same then return s2 end
    s = s2
  end
  return s
end

-- 4. Consuming a pre-filled inbox (the fill also gives a batch figure with acks).
local function phase_consume()
  local n = N.consume
  quiet("4. consume")
  local f0 = fn_settled()
  sql(payments.conninfo, "delete from msgbus.inbox where type = 'bench.flush'")
  sql(rawrecv, "truncate public.raw_out")
  log("4. consume: msgbus, fill the inbox with %d", n)
  local last
  local t0 = core.now()
  check(sbus:transaction(function()
    for i = 1, n do last = check(send("payments", "bench", { n = i })) end
  end))
  local tc = core.now()
  await_ack(last, 300)
  R.fill = { send = tc - t0, ack = core.now() - tc }
  script(payments.conninfo, "vacuum")
  log("4. consume: msgbus listen, no-op handler, %d messages", n)
  t0 = core.now()
  local got = check(rbus:listen(function() end, { max = n, timeout = 60 }))
  R.consume = got / (core.now() - t0)
  if got ~= n then error(("listen handled %d of %d"):format(got, n)) end

  log("4. consume: msgbus, fill the inbox with %d again", n)
  check(sbus:transaction(function()
    for i = 1, n do last = check(send("payments", "bench", { n = i })) end
  end))
  await_ack(last, 300)
  script(payments.conninfo, "vacuum")
  log("4. consume: msgbus listen { batch = %d }, no-op handler, %d messages", BATCH, n)
  t0 = core.now()
  got = check(rbus:listen(function() end, { max = n, timeout = 60, batch = BATCH }))
  R.consume_batch = got / (core.now() - t0)
  if got ~= n then error(("listen { batch } handled %d of %d"):format(got, n)) end
  -- a bus that has listened keeps listening, and every notification in its database
  -- would wake its idle session from now on: the baseline has no such session
  rbus:close()
  rbus = check(msgbus.connect(payments.conninfo))

  quiet()
  log("4. consume: baseline, fill with %d (ack trigger)", n)
  local f = raw("batch", n, rawsend, rawrecv, "raw")
  R.raw_fill = { send = f[1], ack = f[2] }
  if f[3] ~= n then error(("baseline fill: %d rows arrived, expected %d"):format(f[3], n)) end
  script(rawrecv, "vacuum")
  log("4. consume: baseline DELETE .. RETURNING, %d rows", n)
  R.raw_consume = raw("consume", n, rawrecv)[2]
  R.fn4 = { before = f0, after = fn_settled() }
end

local STATS_SQL = [[
  select relname, seq_scan::int8 as seq_scan, coalesce(idx_scan, 0)::int8 as idx_scan,
         n_tup_ins::int8 as ins, n_tup_del::int8 as del
    from pg_stat_user_tables where schemaname = 'msgbus']]
local FUNC_SQL = [[
  select schemaname || '.' || funcname as name, calls::int8 as calls, total_time, self_time
    from pg_stat_user_functions]]

local function snapshot()
  local s = {}
  for side, ci in pairs { store = store.conninfo, payments = payments.conninfo } do
    local t = { rel = {}, fn = {} }
    for _, r in ipairs(sql(ci, STATS_SQL)) do t.rel[r.relname] = r end
    for _, r in ipairs(sql(ci, FUNC_SQL)) do t.fn[r.name] = r end
    s[side] = t
  end
  return s
end

local function sorted_keys(t)
  local keys = {}
  for key in pairs(t) do keys[#keys + 1] = key end
  table.sort(keys)
  return keys
end

local function fingerprint(s)
  local parts = {}
  for _, side in ipairs { "store", "payments" } do
    for _, name in ipairs(sorted_keys(s[side].rel)) do
      local r = s[side].rel[name]
      parts[#parts + 1] = table.concat({ name, r.seq_scan, r.idx_scan, r.ins, r.del }, ",")
    end
  end
  return table.concat(parts, ";")
end

local function delta(before, after, side, kind, name, field)
  local a = after[side][kind][name]
  local b = before[side][kind][name]
  return (a and a[field] or 0) - (b and b[field] or 0)
end

-- Counters reach pg_stat_* when a backend flushes them, at the end of a transaction at
-- least a second after its previous flush (or when it exits): an apply worker or an
-- idle session can sit on its last second's counters. So: wait a second, make the
-- sessions run a statement, send one message and wait for its ack (a commit in both
-- apply workers), drop it, then read until two reads 1.2 s apart agree. The message
-- itself adds one insert and one delete here and there.
local function settled(done)
  core.sleep(1.1)
  check(rbus:exec("select 1"))  -- an idle backend keeps its last second's counters until its next statement
  local id = check(send("payments", "bench.flush", {}))
  await_ack(id, LOST_AFTER)
  sql(payments.conninfo, "delete from msgbus.inbox where type = 'bench.flush'")
  local deadline = core.now() + 20
  local s = snapshot()
  while true do
    core.sleep(1.2)
    local s2 = snapshot()
    if fingerprint(s2) == fingerprint(s) and (not done or done(s2)) then return s2, true end
    if core.now() > deadline then return s2, false end
    s = s2
  end
end

-- After a batch of n: every message of it shows up in the counters.
local function settled_snapshot(before, n)
  return settled(function(s)
    return delta(before, s, "payments", "rel", "seen", "ins") >= n
      and delta(before, s, "payments", "rel", "to_payments", "del") >= n
      and delta(before, s, "store", "rel", "to_payments", "del") >= n
  end)
end

local function read_marks(path)
  local marks = {}
  local f = io.open(path, "r")
  if not f then return marks end
  for line in f:lines() do
    local v = numbers(line)
    if #v == 5 then marks[#marks + 1] = { count = v[1], t = v[2], rss = v[3], heap = v[4], live = v[5] } end
  end
  f:close()
  return marks
end

local function count(ci, rel)
  return sql(ci, "select count(*)::int8 as n from " .. rel)[1].n
end

-- The messages in `rel` (an outbox or the inbox): a pack counts its messages.
local function messages(ci, rel)
  return sql(ci, "select coalesce(sum(msgbus.message_count(type, data)), 0)::int8 as n from " .. rel)[1].n
end

-- 3 and 5: a batch of n messages in one transaction, sent with bus:send_many, MANY a
-- call, with a no-op listener running that handles them with listen { batch = batch }
-- (BATCH unless given).
-- Gives up at `deadline` (core.now() time) and reports how far it got.
local function msgbus_batch(n, stops, deadline, batch)
  quiet(("batch %d"):format(n))
  local before = settled()
  local markfile = ("%s/marks-%d"):format(tmpdir, n)
  local l = listener_spawn("batch", payments.conninfo, markfile, "batch=" .. (batch or BATCH), table.unpack(stops))
  local last
  local t0 = core.now()
  check(sbus:transaction(function()
    for first = 1, n, MANY do
      local list = {}
      for i = first, math.min(first + MANY - 1, n) do list[#list + 1] = { n = i } end
      local ids = check(sbus:send_many("payments", "bench", list))
      sent = sent + #ids
      last = ids[#ids]
    end
  end))
  local tc = core.now()
  local res = { n = n, send = tc - t0, before = before, tc = tc }
  -- the receiver dedups a pack by its own id: the last message's pack, if it went in
  -- one (it is in the outbox until acked; a miss leaves delivery at the ack's time)
  local pack = sql(store.conninfo, [[select id::text as id from msgbus.to_payments
                                      where type = 'msgbus.pack' and received_at is null
                                        and data -> 'ids' ? $1]], last)[1]
  local arrived = pack and pack.id or last
  -- wait for the ack in short slices, noting meanwhile when the receiver's apply
  -- committed (that id in msgbus.seen: an index lookup, to within 50 ms)
  while true do
    if not res.deliver and sql(payments.conninfo, "select 1 as x from msgbus.seen where id = $1::uuid", arrived)[1] then
      res.deliver = core.now() - tc
    end
    local acked, aerr, acode = sbus:wait_ack(last, 0.05)
    if acked then
      res.ack = core.now() - tc
      res.deliver = res.deliver or res.ack
      break
    elseif acode ~= "timeout" then
      error(aerr)
    end
    if core.now() > deadline then break end
  end
  local marks
  while true do
    marks = read_marks(markfile)
    if marks[#marks] and marks[#marks].count == n then break end
    if core.now() > deadline then break end
    core.sleep(0.05)
  end
  res.marks = marks
  res.by = {}
  for _, m in ipairs(marks) do res.by[m.count] = m end
  if res.by[n] then
    finish(l)
    res.consumed = res.by[n].t - tc
    if res.ack then res.all = math.max(res.ack, res.consumed) end
    if res.ack and count(store.conninfo, "msgbus.to_payments") ~= 0 then
      error("the outbox is not empty after the last ack")
    end
    res.after, res.settled = settled_snapshot(before, n)
  else
    -- out of time: stop the listener and count how far things got
    os.execute("kill " .. math.tointeger(l.pid))
    l.p:close()
    children[l.pid] = nil
    res.gave_up = core.now() - tc
    res.n_acked = n - messages(store.conninfo, "msgbus.to_payments")
    res.n_consumed = marks[#marks] and marks[#marks].count or 0
    res.n_delivered = res.n_consumed + messages(payments.conninfo, "msgbus.inbox")
    res.after, res.settled = snapshot(), false
  end
  return res
end

-- A round number not above x: 1, 2 or 5 times a power of ten.
local function round_down(x)
  local p = 10 ^ math.floor(math.log(x, 10))
  for _, m in ipairs { 5, 2, 1 } do
    if m * p <= x then return math.floor(m * p) end
  end
  return math.floor(x)
end

local function phase_batches()
  local w = N.window
  quiet("5. batch small")
  log("5. batch of %d (small backlog), send_many, no-op listener with listen { batch = %d }", N.small, BATCH)
  R.small = msgbus_batch(N.small, { 1, 1 + w, N.small }, BATCHES_END)
  if not R.small.all then error("the small batch did not finish within the time budget") end

  -- Scale the big batch down when the small one says it cannot finish in the time
  -- left. The projection: sending and consuming at the rate of the small batch's last
  -- messages, plus, once, whatever the small batch spent above that rate (a slow
  -- start, such as a plan made for an empty inbox). The baseline's batch and about
  -- 10 s of settling come out of the time left too.
  local sm = R.small
  local steady = (sm.by[N.small].t - sm.by[1 + w].t) / (N.small - 1 - w)
  local per = sm.send / N.small + steady
  local once = math.max(0, sm.consumed - N.small * steady)
  local left = BATCHES_END - core.now() - 10
  local function projected(n) return once + n * per * 1.5 + n * 1e-4 end
  if projected(N.big) > left then
    local fit = N.big
    while fit > 2 * N.small and projected(fit) > left do fit = round_down(fit - 1) end
    R.scaled_down = { from = N.big, to = fit, per = per, once = once, left = left }
    log("3. scaling the big batch down to %d: %.2f ms per message and %.0f s once in the small one, %.0f s left",
      fit, per * 1000, once, left)
    N.big = fit
    N.mem_small = math.min(N.mem_small, math.floor(fit / 10))
  end

  quiet("3. baseline batch")
  log("3. batch: baseline, %d rows into a plain published table", N.big)
  local r = raw("batch", N.big, rawsend, rawrecv, "plain")
  if r[3] ~= N.big then error(("baseline batch: %d rows arrived, expected %d"):format(r[3], N.big)) end
  R.raw_big = { send = r[1], deliver = r[2] }

  local stops = { 1, 1 + w }
  for i = 1, 10 do
    local c = math.floor(N.big * i / 10)
    if c > stops[#stops] then stops[#stops + 1] = c end
  end
  local have = {}
  for _, c in ipairs(stops) do have[c] = true end
  if not have[N.mem_small] then stops[#stops + 1] = N.mem_small end
  table.sort(stops)
  log("3. batch of %d in one transaction (send_many), no-op listener with listen { batch = %d } (gives up after %.0f s)",
    N.big, BATCH, BATCHES_END - core.now())
  R.big = msgbus_batch(N.big, stops, BATCHES_END)
  if R.big.consumed then
    log("3. the same batch again, no-op listener with listen { batch = %d }", WIDE)
    R.big_wide = msgbus_batch(N.big, { 1, N.big }, BATCHES_END, WIDE)
  end
end

---------------------------------------------------------------------------
-- 7. Fan-in: three sending services at once to one receiver
---------------------------------------------------------------------------

local fans, fan_bus = {}, {}  -- { service, conninfo } of the senders on cluster a, and their buses

local function wal_stats()
  local w = {}
  for _, c in ipairs { { "a", store.conninfo }, { "b", payments.conninfo } } do
    w[c[1]] = sql(c[2], "select wal_sync::int8 as syncs, wal_sync_time as sync_ms from pg_stat_wal")[1]
  end
  return w
end

-- pg_stat_wal is complete once every process that wrote WAL flushed its counters: a
-- backend does when it exits, an apply worker at a commit at least a second after its
-- previous flush. So wait a second, send one message through each pair `who` and
-- wait for its ack (a commit in both apply workers), then read.
local function fan_settled(who)
  core.sleep(1.1)
  local ids = {}
  for _, i in ipairs(who) do ids[i] = check(fan_bus[i]:send("payments", "bench.flush", {})) end
  for _, i in ipairs(who) do check(fan_bus[i]:wait_ack(ids[i], LOST_AFTER)) end
  sql(payments.conninfo, "delete from msgbus.inbox where type = 'bench.flush'")
  return wal_stats()
end

local function fan_acc()
  return { n = 0, t_ack = 0, t_con = 0, senders = {}, runs = 0,
           cpu = cpu_acc(),
           wal = { a = { syncs = 0, sync_ms = 0 }, b = { syncs = 0, sync_ms = 0 } } }
end

-- One run: the senders `who` (indexes into `fans`), each its own process, send n
-- messages each, starting at the same moment, while a listener process on payments
-- handles them all with listen { batch = BATCH }. Adds its figures to `acc`.
local function fanin_run(who, n, acc)
  quiet()
  for _, f in ipairs(fans) do script(f.conninfo, "vacuum") end
  local wal0 = fan_settled(who)
  local gofile = tmpdir .. "/fanin-go"
  os.remove(gofile)
  local l = fanin_spawn("listen", payments.conninfo, n * #who, BATCH, gofile)
  local roles = { [l.pid] = "listener process (Lua)" }
  local senders, running = {}, {}
  for k, i in ipairs(who) do
    senders[k] = fanin_spawn("send", fans[i].conninfo, "payments", n, gofile)
    roles[senders[k].pid] = "sender processes (Lua)"
    running["msgbus_payments_to_" .. fans[i].service] = true
  end
  -- every walsender of payments decodes all its WAL; only those of the running
  -- senders' links have acks to send
  for _, r in ipairs(sql(payments.conninfo, [[select active_pid as pid, slot_name as name
                                                from pg_replication_slots where active_pid is not null]])) do
    roles[r.pid] = running[r.name] and "b walsenders, running" or "b walsenders, idle"
  end
  local c0 = cpu_snapshot(roles)
  check(io.open(gofile, "w")):close()
  local first, acked = math.huge, 0
  for k, c in ipairs(senders) do
    local v = numbers(c.p:read("l"))
    if #v ~= 3 then error("a fan-in sender failed (see its message above)") end
    local s = acc.senders[who[k]] or { n = 0, send = 0, lag = 0 }
    s.n, s.send, s.lag = s.n + n, s.send + v[2] - v[1], s.lag + v[3] - v[2]
    acc.senders[who[k]] = s
    first, acked = math.min(first, v[1]), math.max(acked, v[3])
  end
  local consumed = numbers(l.p:read("l"))[1]
  if not consumed then error("the fan-in listener failed (see its message above)") end
  local c1 = cpu_snapshot(roles)
  os.remove(gofile)
  for _, c in ipairs(senders) do finish(c) end
  finish(l)
  local wal1 = fan_settled(who)
  cpu_add(acc.cpu, c0, c1)
  for side, w in pairs(wal1) do
    acc.wal[side].syncs = acc.wal[side].syncs + w.syncs - wal0[side].syncs
    acc.wal[side].sync_ms = acc.wal[side].sync_ms + w.sync_ms - wal0[side].sync_ms
  end
  acc.n, acc.runs = acc.n + n * #who, acc.runs + 1
  acc.t_ack, acc.t_con = acc.t_ack + acked - first, acc.t_con + consumed - first
end

local function set_wal_timing(on)
  for _, ci in ipairs { store.conninfo, payments.conninfo } do
    sql(ci, on and "alter system set track_wal_io_timing = on" or "alter system reset track_wal_io_timing")
    sql(ci, "select pg_reload_conf()")
  end
end

-- 7. The senders get their databases and links for this figure only: each link adds
-- a walsender on b that decodes all of payments' WAL, which would weigh on the others.
local function phase_fanin()
  quiet("7. fan-in")
  for i, name in ipairs(FANIN) do
    fans[i] = { service = name, conninfo = A:conninfo(name) }
    check(A:createdb(name))
    log("7. fan-in: linking %s (a) and payments (b)", name)
    check(msgbus.setup.link(fans[i], payments))
    fan_bus[i] = check(msgbus.connect(fans[i].conninfo))
  end
  set_wal_timing(true)
  -- the new subscriptions' workers start within seconds; the first messages also
  -- make the plans of every statement on the way
  log("7. fan-in: %d warm-up messages from each sender", N.warm)
  local last = {}
  for i = 1, #fans do
    for j = 1, N.warm do last[i] = check(fan_bus[i]:send("payments", "bench.warm", { n = j })) end
  end
  for i = 1, #fans do check(fan_bus[i]:wait_ack(last[i], 60)) end

  local n = math.max(1, N.fanin // FANIN_ROUNDS)
  local alone, together = {}, fan_acc()
  for i = 1, #fans do alone[i] = fan_acc() end
  local every = {}
  for i = 1, #fans do every[i] = i end
  local function each_alone(round)
    for i = 1, #fans do
      log("7. fan-in, round %d of %d: %s alone, %d messages", round, FANIN_ROUNDS, FANIN[i], n)
      fanin_run({ i }, n, alone[i])
    end
  end
  local function all_at_once(round)
    log("7. fan-in, round %d of %d: %d senders at once, %d messages each", round, FANIN_ROUNDS, #fans, n)
    fanin_run(every, n, together)
  end
  for round = 1, FANIN_ROUNDS do
    if round % 2 == 1 then
      each_alone(round)
      all_at_once(round)
    else
      all_at_once(round)
      each_alone(round)
    end
  end
  R.fanin = { n = n, alone = alone, together = together }

  set_wal_timing(false)
  quiet()
  for i, f in ipairs(fans) do
    fan_bus[i]:close()
    log("7. fan-in: unlinking %s", f.service)
    check(msgbus.setup.unlink(f, payments))
  end
end

---------------------------------------------------------------------------
-- 6 at BENCH_MEMORY: a listener's memory over a long run
---------------------------------------------------------------------------

-- A listener process handles MEMORY messages with listen { batch = BATCH } and notes
-- its VmRSS and Lua heap along the way. The store feeds it in transactions of
-- MEMORY_TX, each sent once the previous one is acked and the inbox holds at most two
-- more, so the listener always has work and the backlog stays that of a listener that
-- keeps up. Gives up at the end of the budget and says how far it got.
local function phase_memory()
  local n = MEMORY
  quiet("6. memory")
  local stops, have = {}, {}
  for _, c in ipairs { 1000, 10000, 100000, n } do have[c] = true end
  for i = 1, 9 do have[n * i // 10] = true end
  for c in pairs(have) do
    if c <= n then stops[#stops + 1] = c end
  end
  table.sort(stops)
  local markfile = tmpdir .. "/marks-memory"
  local l = listener_spawn("batch", payments.conninfo, markfile, "batch=" .. BATCH, table.unpack(stops))
  log("6. memory: %d messages in transactions of %d, listen { batch = %d } (gives up after %.0f s)",
    n, MEMORY_TX, BATCH, BUDGET_END - core.now())
  local seen0 = count(payments.conninfo, "msgbus.seen")
  local res = { n = n, t0 = core.now(), txs = 0 }
  local fed, last = 0, nil
  local function out_of_time() return core.now() > BUDGET_END end
  while fed < n and not out_of_time() do
    while last and not out_of_time() do
      local acked, aerr, acode = sbus:wait_ack(last, 0.2)
      if acked then break end
      if acode ~= "timeout" then error(aerr) end
    end
    while not out_of_time() and count(payments.conninfo, "msgbus.inbox") > 2 * MEMORY_TX do core.sleep(0.2) end
    if out_of_time() then break end
    local k = math.min(MEMORY_TX, n - fed)
    check(sbus:transaction(function()
      for i = 1, k do last = send("payments", "bench", { n = fed + i }) end
    end))
    fed, res.txs = fed + k, res.txs + 1
  end
  local marks
  while true do
    marks = read_marks(markfile)
    if (marks[#marks] and marks[#marks].count == n) or out_of_time() then break end
    core.sleep(0.5)
  end
  res.marks, res.by = marks, {}
  for _, m in ipairs(marks) do res.by[m.count] = m end
  if res.by[n] then
    finish(l)
    res.time = res.by[n].t - res.t0
    while not out_of_time() do
      local acked, aerr, acode = sbus:wait_ack(last, 0.2)
      if acked then res.acked = true break end
      if acode ~= "timeout" then error(aerr) end
    end
  else
    os.execute("kill " .. math.tointeger(l.pid))
    l.p:close()
    children[l.pid] = nil
    res.gave_up = core.now() - res.t0
    res.fed = fed
    res.n_delivered = count(payments.conninfo, "msgbus.seen") - seen0
    res.n_consumed = res.n_delivered - count(payments.conninfo, "msgbus.inbox")
  end
  R.mem = res
end

---------------------------------------------------------------------------
-- Output
---------------------------------------------------------------------------

local rows = {}
local function row(fig, mval, bval, unit, fmt)
  local function show(v)
    if type(v) == "string" then return v end
    if v == nil or v ~= v then return "n/a" end
    return (fmt or "%.3f"):format(v) .. (unit and (" " .. unit) or "")
  end
  local ratio = "n/a"
  if type(mval) == "number" and type(bval) == "number" and bval ~= 0 and mval == mval and bval == bval then
    ratio = ("%.2f"):format(mval / bval)
  end
  rows[#rows + 1] = { fig, show(mval), show(bval), ratio }
end

local function fmt_table(t, header)
  local all = { header }
  for _, r in ipairs(t) do all[#all + 1] = r end
  local width = {}
  for _, r in ipairs(all) do
    for i, c in ipairs(r) do width[i] = math.max(width[i] or 0, utf8.len(c) or #c) end
  end
  local out = {}
  for k, r in ipairs(all) do
    local cells = {}
    for i, c in ipairs(r) do
      local pad = width[i] - (utf8.len(c) or #c)
      cells[i] = (i == 1) and (c .. (" "):rep(pad)) or ((" "):rep(pad) .. c)
    end
    out[#out + 1] = "| " .. table.concat(cells, " | ") .. " |"
    if k == 1 then
      local dashes = {}
      for i = 1, #r do dashes[i] = ("-"):rep(width[i]) end
      out[#out + 1] = "|-" .. table.concat(dashes, "-|-") .. "-|"
    end
  end
  return table.concat(out, "\n")
end

local function ms(v) return type(v) == "number" and v * 1000 or v end
local function us(v) return type(v) == "number" and v * 1e6 or v end
local function k(n)
  if n >= 1e6 and n % 1e5 == 0 then return ("%gM"):format(n / 1e6) end
  return n >= 1000 and (("%gk"):format(n / 1000)) or tostring(n)
end

local function scans_table(b)
  local srows = {}
  for _, side in ipairs { "store", "payments" } do
    for _, name in ipairs(sorted_keys(b.after[side].rel)) do
      local sd = delta(b.before, b.after, side, "rel", name, "seq_scan")
      local id = delta(b.before, b.after, side, "rel", name, "idx_scan")
      local ins = delta(b.before, b.after, side, "rel", name, "ins")
      local del = delta(b.before, b.after, side, "rel", name, "del")
      if sd + id + ins + del > 0 then
        srows[#srows + 1] = { side .. " msgbus." .. name, tostring(sd), ("%.2f"):format(sd / b.n),
                              tostring(id), tostring(ins), tostring(del) }
      end
    end
  end
  return fmt_table(srows, { "table", "seq_scan", "seq_scan/msg", "idx_scan", "inserted", "deleted" })
end

local function functions_table(b)
  local frows = {}
  for _, side in ipairs { "store", "payments" } do
    for _, name in ipairs(sorted_keys(b.after[side].fn)) do
      local calls = delta(b.before, b.after, side, "fn", name, "calls")
      if calls > 0 then
        local tot = delta(b.before, b.after, side, "fn", name, "total_time")
        frows[#frows + 1] = { side .. " " .. name, tostring(calls), ("%.0f"):format(tot),
                              ("%.1f"):format(tot * 1000 / calls) }
      end
    end
  end
  return fmt_table(frows, { "function", "calls", "total ms", "µs/call" })
end

-- Figure 7: where the time went, the pairs alone (summed) next to all at once.
local FANIN_WHO = {
  { "b apply workers", "b: apply workers (the senders' subscriptions)" },
  { "b walsenders, running", "b: walsenders of the running senders' links (acks)" },
  { "b walsenders, idle", "b: walsenders of the other links (decode only)" },
  { "b backends", "b: sessions (the listener's, the bench's)" },
  { "b background", "b: WAL writer, checkpointer, autovacuum" },
  { "a apply workers", "a: apply workers (acks arriving)" },
  { "a walsenders", "a: walsenders (the senders' outboxes)" },
  { "a backends", "a: sessions (the senders')" },
  { "a background", "a: WAL writer, checkpointer, autovacuum" },
  { "sender processes (Lua)", "sender processes (Lua)" },
  { "listener process (Lua)", "listener process (Lua)" },
}

local function fanin_table(F)
  local alone = { n = 0, cpu = { wall = 0, who = {}, wait = {}, busiest = 0, busy = 0, iowait = 0 },
                  wal = { a = { syncs = 0, sync_ms = 0 }, b = { syncs = 0, sync_ms = 0 } } }
  for _, a in ipairs(F.alone) do
    alone.n = alone.n + a.n
    local c = alone.cpu
    c.wall, c.busy, c.iowait = c.wall + a.cpu.wall, c.busy + a.cpu.busy, c.iowait + a.cpu.iowait
    c.busiest = math.max(c.busiest, a.cpu.busiest)
    for who, v in pairs(a.cpu.who) do c.who[who] = (c.who[who] or 0) + v end
    for who, v in pairs(a.cpu.wait) do c.wait[who] = (c.wait[who] or 0) + v end
    for side, w in pairs(a.wal) do
      alone.wal[side].syncs = alone.wal[side].syncs + w.syncs
      alone.wal[side].sync_ms = alone.wal[side].sync_ms + w.sync_ms
    end
  end
  local cols = { alone, F.together }
  local trows = {}
  local function add(label, f)
    local r = { label }
    for _, x in ipairs(cols) do
      local per, share, wait = f(x)
      r[#r + 1], r[#r + 2], r[#r + 3] = per, share, wait or ""
    end
    trows[#trows + 1] = r
  end
  local function cpu(seconds, x, wait)
    return ("%.0f µs"):format(seconds * 1e6 / x.n), ("%.2f cores"):format(seconds / x.cpu.wall),
      wait and ("%.0f µs"):format(wait * 1e6 / x.n)
  end
  for _, w in ipairs(FANIN_WHO) do
    add(w[2], function(x) return cpu(x.cpu.who[w[1]] or 0, x, x.cpu.wait[w[1]] or 0) end)
  end
  add("all of the above", function(x)
    local sum, wait = 0, 0
    for who, v in pairs(x.cpu.who) do sum, wait = sum + v, wait + x.cpu.wait[who] end
    return cpu(sum, x, wait)
  end)
  add("the whole machine, busy (other users' work too)", function(x) return cpu(x.cpu.busy, x) end)
  add("the whole machine, waiting for I/O", function(x) return cpu(x.cpu.iowait, x) end)
  add("b: the busiest single apply worker", function(x) return "", ("%.2f cores"):format(x.cpu.busiest) end)
  for _, side in ipairs { "b", "a" } do
    add(side .. ": WAL fsyncs (pg_stat_wal), and share of the time one ran", function(x)
      local w = x.wal[side]
      return ("%.2f a msg"):format(w.syncs / x.n), ("%.0f %%"):format(w.sync_ms / 10 / x.cpu.wall)
    end)
  end
  return ("Figure 7: CPU time a message, cores busy (CPU s / wall s) and time spent waiting for a CPU (runnable, from"
    .. " /proc/PID/schedstat) a message; %s messages of the pairs alone (summed) and %s at once\n")
    :format(k(alone.n), k(F.together.n))
    .. fmt_table(trows, { "process", "alone: CPU", "alone: share", "alone: CPU wait",
                          "at once: CPU", "at once: share", "at once: CPU wait" })
end

local function report(total)
  local L, RL = R.lat, R.raw_lat
  row("1. send -> wait_ack returns, p50 [raw: INSERT, LISTEN + SELECT ack]", ms(L.p50), ms(RL.p50), "ms")
  row("1. send -> wait_ack returns, p99", ms(L.p99), ms(RL.p99), "ms")
  row("1. send -> handler start, p50 [raw: DELETE..RETURNING has the row]", ms(R.lat_h.p50), ms(R.raw_lat_h.p50), "ms")
  row("1. send -> handler start, p99", ms(R.lat_h.p99), ms(R.raw_lat_h.p99), "ms")
  row("1. send -> wait_ack returns, p50, no listener running [raw: same]", ms(R.lat_nol.p50), ms(R.raw_lat_nol.p50), "ms")
  row("1. send -> wait_ack returns, p99, no listener running", ms(R.lat_nol.p99), ms(R.raw_lat_nol.p99), "ms")
  row("1. acks lost: delivered, yet left in the sender's outbox (whole run)",
      ("%d of %d messages"):format(#lost, sent), "n/a: raw acks only insert", nil)
  row("2. single-message sends [raw: libpq prepared INSERT]", R.sends, R.raw_sends, "msg/s", "%.0f")
  row("2. single-message sends [raw: luasql INSERT]", R.sends, R.luasql_sends, "msg/s", "%.0f")
  row("2. single-message sends [raw exactly-once: dedup, an ack that removes the row]", R.sends, R.exact_sends,
      "msg/s", "%.0f")
  row("2. single-message sends, replication paused [raw: libpq prepared INSERT]", R.p_sends, R.p_raw_sends,
      "msg/s", "%.0f")
  row("2. single-message sends, replication paused [raw: luasql INSERT]", R.p_sends, R.p_luasql_sends, "msg/s", "%.0f")
  local big, rb, s = R.big, R.raw_big, R.small
  local bn = k(big.n)
  local why_ack = not big.ack and ("n/a: gave up after %.0f s, %d of %d acked"):format(big.gave_up, big.n_acked, big.n)
  local why_con = not big.consumed and ("n/a: gave up after %.0f s, %d of %d delivered, %d consumed")
    :format(big.gave_up, big.n_delivered, big.n, big.n_consumed)
  local why_all = why_ack or why_con
  row(("3. batch %s: send_many in one transaction [raw: INSERTs into plain table]"):format(bn), big.send, rb.send, "s")
  row(("3. batch %s: commit -> all in the receiver's inbox [raw: commit -> subscriber has all rows]"):format(bn),
      big.deliver or ("n/a: not delivered after %.0f s"):format(big.gave_up), rb.deliver, "s")
  row(("3. batch %s: commit -> all acked [raw: commit -> subscriber has all rows]"):format(bn),
      big.ack or why_ack, rb.deliver, "s")
  row(("3. batch %s: commit -> all consumed, listen { batch = %d } [raw: same]"):format(bn, BATCH),
      big.consumed or why_con, rb.deliver, "s")
  local wide = R.big_wide
  row(("3. batch %s: commit -> all consumed, listen { batch = %d } [raw: same]"):format(bn, WIDE),
      wide and wide.consumed or ("n/a: %s"):format(wide and "gave up" or "not run, the first did not finish"),
      rb.deliver, "s")
  row(("3. batch %s: commit -> all acked [raw: table with ack trigger]"):format(k(N.consume)),
      R.fill.ack, R.raw_fill.ack, "s")
  row(("4. consume pre-filled inbox of %s [raw: libpq DELETE..RETURNING, 1 row/tx]"):format(k(N.consume)),
      R.consume, R.raw_consume, "msg/s", "%.0f")
  row(("4. consume the same, listen { batch = %d } [raw: same]"):format(BATCH),
      R.consume_batch, R.raw_consume, "msg/s", "%.0f")
  row(("5. consume+ack per msg, backlog %s [base: backlog %s]"):format(bn, k(s.n)),
      big.all and us(big.all / big.n) or why_all, us(s.all / s.n), "µs", "%.1f")
  row(("5. ack per msg, backlog %s [base: backlog %s]"):format(bn, k(s.n)),
      big.ack and us(big.ack / big.n) or why_ack, us(s.ack / s.n), "µs", "%.1f")
  local w = N.window
  -- from the end of the first handler to the end of the (1+w)th: the batch's arrival
  -- is noted to within 50 ms, longer than a listener { batch } takes for 500 of 1,000
  -- (the details give the time from arrival to the first handler)
  local function window(b)
    if not (b.by[1] and b.by[1 + w]) then return "n/a: fewer than " .. (1 + w) .. " consumed" end
    return us((b.by[1 + w].t - b.by[1].t) / w)
  end
  row(("5. consume per msg, messages 2 to %d at backlog %s [base: backlog %s]"):format(1 + w, bn, k(s.n)),
      window(big), window(s), "µs", "%.1f")
  local function rss(m, n) return m and rss_mib(m.rss) or ("n/a: %s messages not consumed"):format(k(n)) end
  local function live(m, n) return m and m.live or ("n/a: %s messages not consumed"):format(k(n)) end
  if R.mem then
    local M = R.mem
    local m10, m100 = M.by[10000], M.by[100000]
    local how = ("listen { batch = %d }"):format(BATCH)
    row(("6. listener VmRSS after 10k msgs, %s [base: when ready]"):format(how), rss(m10, 10000), rss(M.by[0], 0),
        "MiB", "%.1f")
    if M.n > 100000 then
      row("6. listener VmRSS after 100k msgs [base: after 10k]", rss(m100, 100000), rss(m10, 10000), "MiB", "%.1f")
    end
    row(("6. listener VmRSS after %s msgs [base: after 10k]"):format(k(M.n)), rss(M.by[M.n], M.n), rss(m10, 10000),
        "MiB", "%.1f")
    if M.n > 100000 then
      row("6. listener Lua heap, live (after a full GC), after 100k msgs [base: after 10k]", live(m100, 100000),
          live(m10, 10000), "KiB", "%.1f")
    end
    row(("6. listener Lua heap, live (after a full GC), after %s msgs [base: after 10k]"):format(k(M.n)),
        live(M.by[M.n], M.n), live(m10, 10000), "KiB", "%.1f")
  else
    local m0, m1, m2 = big.by[0], big.by[N.mem_small], big.by[big.n]
    row(("6. listener VmRSS after %s msgs [base: when ready]"):format(k(N.mem_small)),
        rss(m1, N.mem_small), rss(m0, 0), "MiB", "%.1f")
    row(("6. listener VmRSS after %s msgs [base: after %s]"):format(bn, k(N.mem_small)),
        rss(m2, big.n), rss(m1, N.mem_small), "MiB", "%.1f")
  end
  local F = R.fanin
  local alone_ack, alone_con = 0, 0
  for _, a in ipairs(F.alone) do
    alone_ack, alone_con = alone_ack + a.n / a.t_ack, alone_con + a.n / a.t_con
  end
  row(("7. fan-in: receiver msg/s with %d senders at once [base: sum of the %d pairs alone]"):format(#FANIN, #FANIN),
      F.together.n / F.together.t_ack, alone_ack, "msg/s", "%.0f")
  row(("7. fan-in: consumed msg/s, listen { batch = %d }, %d at once [base: same, sum alone]"):format(BATCH, #FANIN),
      F.together.n / F.together.t_con, alone_con, "msg/s", "%.0f")

  print(("msgbus benchmarks: PostgreSQL %s, %s cores, BENCH_SCALE=%g, total %.0f s")
    :format(R.pg_version or "?", R.cores or "?", SCALE, total))
  print("ratio = msgbus / baseline (for msg/s, below 1 means msgbus is slower; for times, above 1)")
  print()
  print(fmt_table(rows, { "figure", "msgbus", "baseline", "ratio" }))
  print()

  print("Details")
  print(("- latency: %d rounds of %d messages one at a time after %d warm-up, msgbus and raw taking turns;"
    .. " samples: send -> ack %d / %d, handler start %d / %d, no listener %d / %d (msgbus / raw)")
    :format(ROUNDS, N.latency // ROUNDS, N.warm, L.n, RL.n, R.lat_h.n, R.raw_lat_h.n, R.lat_nol.n, R.raw_lat_nol.n))
  -- server CPU a message by kind of process: where the time of figures 1 and 2 goes
  local function per_msg(acc)
    local kinds, sum = {}, 0
    for who, v in pairs(acc.who) do
      local u = v / acc.n * 1e6
      sum = sum + u
      if u >= 5 then kinds[#kinds + 1] = ("%s %.0f"):format(who, u) end
    end
    table.sort(kinds)
    return ("%.0f (%s)"):format(sum, table.concat(kinds, ", "))
  end
  print("- server CPU a message, all processes of both clusters (a: the sender's, b: the receiver's), µs:")
  print(("  latency, no listener: msgbus %s; raw %s"):format(per_msg(R.cpu_lat.m), per_msg(R.cpu_lat.r)))
  print(("  sends (with replication catching up): msgbus %s; raw %s; raw exactly-once %s;"
    .. " the machine was %.2f, %.2f and %.2f cores busy")
    :format(per_msg(R.cpu_sends.m), per_msg(R.cpu_sends.r), per_msg(R.cpu_sends.x),
      R.cpu_sends.m.busy / R.cpu_sends.m.wall, R.cpu_sends.r.busy / R.cpu_sends.r.wall,
      R.cpu_sends.x.busy / R.cpu_sends.x.wall))
  print(("- sends: %d rounds of %d through each of bus:send, libpq, libpq exactly-once and luasql")
    :format(ROUNDS, N.sends // ROUNDS))
  if type(R.luasql_sends) == "number" and type(R.p_luasql_sends) == "number" then
    print(("- sends, the baseline against luasql in the same run: libpq prepared INSERTs %.2f of luasql's rate with"
      .. " replication running, %.2f with it paused (%d rounds of %d each, the receiving subscriptions of msgbus"
      .. " and of the baseline disabled while they ran)")
      :format(R.raw_sends / R.luasql_sends, R.p_raw_sends / R.p_luasql_sends, ROUNDS, N.sends // ROUNDS))
  end
  for _, b in ipairs { s, big } do
    local seg = {}
    for i = 2, #b.marks do
      local x, y = b.marks[i - 1], b.marks[i]
      if x.count >= 1 and y.count - x.count >= 100 then
        seg[#seg + 1] = ("%s-%s: %.0f"):format(k(x.count), k(y.count), us((y.t - x.t) / (y.count - x.count)))
      end
    end
    print(("- batch %s: send %.2f s; commit -> in inbox %s; commit -> acked %s; commit -> consumed %s")
      :format(k(b.n), b.send, b.deliver and ("%.2f s"):format(b.deliver) or "n/a",
      b.ack and ("%.2f s"):format(b.ack) or "n/a", b.consumed and ("%.2f s"):format(b.consumed) or "n/a"))
    if b.by[1] and b.deliver then
      local after = b.by[1].t - b.tc - b.deliver
      if after >= 0 then
        print(("  the first message was handled %.3f s after the batch was in the inbox"):format(after))
      else
        print(("  the first message was handled before the batch was seen in the inbox (%.3f s: that is looked"
          .. " up every 50 ms)"):format(after))
      end
    end
    if #seg > 0 then
      print("  consume cost along the way, µs per message: " .. table.concat(seg, ", "))
    end
  end
  print(("- batch %s (the fill of figure 4, no listener): msgbus send %.3f s, ack %.3f s; raw send %.3f s, ack %.3f s")
    :format(k(N.consume), R.fill.send, R.fill.ack, R.raw_fill.send, R.raw_fill.ack))
  local mem = {}
  for _, m in ipairs(big.marks) do
    mem[#mem + 1] = ("%s: %.1f (heap %.2f, live %.2f)"):format(k(m.count), rss_mib(m.rss), m.heap / 1024, m.live / 1024)
  end
  print("- listener of the big batch, VmRSS MiB (Lua heap MiB, live after a full GC) after N messages: "
    .. table.concat(mem, ", "))
  if R.mem then
    local M = R.mem
    mem = {}
    for _, m in ipairs(M.marks) do
      mem[#mem + 1] = ("%s: %d (heap %.0f, live %.0f)"):format(k(m.count), m.rss, m.heap, m.live)
    end
    print(("- BENCH_MEMORY: %s messages fed in %d transactions of %s and handled with listen { batch = %d } %s")
      :format(k(M.n), M.txs, k(MEMORY_TX), BATCH, M.time and ("in %.0f s (%.0f msg/s)"):format(M.time, M.n / M.time)
        or ("n/a: gave up after %.0f s, %d fed, %d delivered, %d consumed")
          :format(M.gave_up, M.fed, M.n_delivered, M.n_consumed)))
    print("  its listener, VmRSS KiB (Lua heap KiB, live after a full GC) after N messages: " .. table.concat(mem, ", "))
  end
  local T = F.together
  print(("- fan-in: %s (databases on cluster a) each linked to payments for figure 7 only; %d rounds of %d messages"
    .. " per sender, one transaction each (round 1: each alone, then all at once; round 2: the other way round);"
    .. " in every run a listener process handles them with listen { batch = %d }")
    :format(table.concat(FANIN, ", "), FANIN_ROUNDS, F.n, BATCH))
  for i, a in ipairs(F.alone) do
    local sd = a.senders[i]
    print(("  %s alone: %.0f msg/s acked, %.0f consumed; its sends %.0f msg/s, last commit -> acked %.3f s a run")
      :format(FANIN[i], a.n / a.t_ack, a.n / a.t_con, sd.n / sd.send, sd.lag / a.runs))
  end
  for i in ipairs(FANIN) do
    local sd = T.senders[i]
    print(("  %s at once: its sends %.0f msg/s, last commit -> acked %.3f s a run")
      :format(FANIN[i], sd.n / sd.send, sd.lag / T.runs))
  end
  local cpu_msg, cpu_b = 0, 0
  for who, v in pairs(T.cpu.who) do
    cpu_msg = cpu_msg + v / T.n
    if who:match("^b ") or who == "listener process (Lua)" then cpu_b = cpu_b + v / T.n end
  end
  local cores = tonumber(R.cores) or 0
  print(("  CPU ceiling: at once, the processes of both servers and the Lua processes used %.0f µs of CPU a message;"
    .. " all %d cores would carry at most %.0f msg/s, %.2f of the sum alone (the table at the end:"
    .. " the machine was %.2f cores busy, other users' work included). %.0f µs of it were the receiver's (b's"
    .. " processes and the listener): a receiver with %d cores of its own would carry at most %.0f msg/s, %.2f of the"
    .. " sum alone")
    :format(cpu_msg * 1e6, cores, cores / cpu_msg, cores / cpu_msg / alone_ack, T.cpu.busy / T.cpu.wall,
      cpu_b * 1e6, cores, cores / cpu_b, cores / cpu_b / alone_ack))
  for _, x in ipairs(lost) do
    print(("- lost ack: message %s (phase %s) reached payments, was acked, and stayed in the store's outbox")
      :format(x.id, x.phase))
  end
  if big.gave_up then
    print(("- the %s batch was stopped after %.0f s (BENCH_BUDGET=%g s for the whole run)")
      :format(bn, big.gave_up, BUDGET))
  end

  if R.scaled_down then
    local sd = R.scaled_down
    print(("- the big batch was scaled down from %s to %s: the %s batch sent and consumed at %.2f ms per message"
      .. " (after a one-off %.1f s), which projects %.0f s for %s (with a margin of 1.5), and %.0f s of"
      .. " BENCH_BUDGET=%g were left"):format(k(sd.from), k(sd.to), k(s.n), sd.per * 1000, sd.once,
      sd.once + sd.per * 1.5 * sd.from, k(sd.from), sd.left, BUDGET))
  end

  print()
  print(("Figure 4 phase (a fill of %s with no listener, then consuming it; msgbus and raw):"
    .. " PL/pgSQL function times"):format(k(N.consume)))
  local frows = {}
  for _, side in ipairs { "store", "payments", "rawsend", "rawrecv" } do
    for _, name in ipairs(sorted_keys(R.fn4.after[side])) do
      local a, b = R.fn4.after[side][name], R.fn4.before[side][name]
      local calls = a.calls - (b and b.calls or 0)
      if calls > 0 then
        local tot = a.total_time - (b and b.total_time or 0)
        frows[#frows + 1] = { side .. " " .. name, tostring(calls), ("%.0f"):format(tot), ("%.1f"):format(tot * 1000 / calls) }
      end
    end
  end
  print(fmt_table(frows, { "function", "calls", "total ms", "µs/call" }))

  print()
  print(fanin_table(F))

  for _, b in ipairs { s, big } do
    print()
    print(("Batch %s: table scans (pg_stat_user_tables deltas%s)"):format(k(b.n),
      b.settled and "" or "; NOT settled: counts may be incomplete"))
    print(scans_table(b))
    print()
    print(("Batch %s: PL/pgSQL function times (pg_stat_user_functions)"):format(k(b.n)))
    print(functions_table(b))
  end
end

---------------------------------------------------------------------------
-- Main
---------------------------------------------------------------------------

local function cleanup()
  for pid in pairs(children) do os.execute("kill " .. math.tointeger(pid) .. " 2>/dev/null") end
  children = {}
  for _, b in pairs(fan_bus) do b:close() end
  for _, c in pairs(admin) do c:close() end
  if sbus then sbus:close() end
  if rbus then rbus:close() end
  cluster.destroy_all()
  if tmpdir and tmpdir:match("/msgbus%-bench%.%w+$") then os.execute("rm -rf " .. q(tmpdir)) end
end

local ok, err = xpcall(function()
  log("sizes: latency %d, sends %d, consume %d, batches %d and %d, memory at %d and %d%s, fan-in %d per sender"
    .. " (BENCH_SCALE=%g)", N.latency, N.sends, N.consume, N.small, N.big, N.mem_small, N.big,
    MEMORY and (", BENCH_MEMORY=%d"):format(MEMORY) or "", N.fanin, SCALE)
  tmpdir = build_raw()
  setup()
  sbus = check(msgbus.connect(store.conninfo))
  rbus = check(msgbus.connect(payments.conninfo))
  R.pg_version = sql(store.conninfo, "select current_setting('server_version') as v")[1].v
  R.cores = sh("nproc"):gsub("%s+$", "")
  CLK_TCK = tonumber(sh("getconf CLK_TCK")) or CLK_TCK
  phase_latency()
  phase_sends()
  phase_sends_paused()
  phase_consume()
  phase_fanin()
  phase_batches()
  if R.big.ack then reap() end
  if MEMORY then
    phase_memory()
    if R.mem.acked then reap() end
  end
end, debug.traceback)

if not ok then
  io.stderr:write("bench: ", tostring(err), "\n")
  for _, c in ipairs { A, B } do
    if c then io.stderr:write(("--- server log of cluster %s (last 40 lines) ---\n%s\n"):format(c.name, c:log(40))) end
  end
  cleanup()
  os.exit(1)
end
cleanup()
log("done")
report(core.now() - T_START)
