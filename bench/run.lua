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
  mem_small = scaled(10000, 100) -- listener RSS checkpoint (the other is `big`)
}
N.small = math.min(1000, N.big)  -- the small backlog
local BATCH = 50                 -- listen's opts.batch in figure 4's second row
N.window = math.min(500, N.small - 1)
if N.mem_small >= N.big then N.mem_small = math.floor(N.big / 10) end

-- The big batch gives up (and says how far it got) when the run would pass this.
local BUDGET = tonumber(os.getenv("BENCH_BUDGET") or "") or 300 * math.max(1, SCALE)
local BUDGET_END = T_START + BUDGET - 15  -- leaves time to stop the clusters and report

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

local function listener_spawn(mode, conninfo, ...)
  local parts = { "exec", "env", "LUA_PATH=" .. q(package.path), "LUA_CPATH=" .. q(package.cpath), q(LUA),
                  q(script_dir .. "/listener.lua"), mode, q(conninfo) }
  for _, a in ipairs { ... } do parts[#parts + 1] = tostring(a) end
  return spawn(table.concat(parts, " "))
end

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
  for _, r in ipairs(sql(store.conninfo, "select id::text as id from msgbus.to_payments")) do
    if not sql(payments.conninfo, "select 1 as x from msgbus.seen where id = $1::uuid", r.id)[1] then
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
  sql(rawrecv, "truncate public.raw_out, public.plain_out")
  sql(rawsend, "truncate public.plain_out")
  for _, ci in ipairs { store.conninfo, payments.conninfo, rawsend, rawrecv } do script(ci, "vacuum") end
end

---------------------------------------------------------------------------
-- The figures
---------------------------------------------------------------------------

local R = {}  -- results, filled by the phases

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
    -- the same without anything consuming on the receiving side
    quiet("1. latency, no listener")
    msgbus_latency(b, warm, m0)
    quiet()
    append_samples(r0, sh(("%s latency %d %d %s"):format(q(raw_bin), b, warm, q(rawsend))))
  end
  R.lat, R.raw_lat = summary(m), summary(r)
  R.lat_h, R.raw_lat_h = summary(mh), summary(rh)
  R.lat_nol, R.raw_lat_nol = summary(m0), summary(r0)
end

-- 2. Single-message sends, one transaction each, in turns.
local function phase_sends()
  local b = math.max(1, N.sends // ROUNDS)
  local env, conn
  if luasql_ok then
    env = luasql.postgres()
    conn = check(env:connect(rawsend))
  end
  local t_m, t_r, t_l = 0, 0, 0
  for round = 1, ROUNDS do
    log("2. sends, round %d of %d: %d each through bus:send, libpq, luasql", round, ROUNDS, b)
    quiet("2. sends")
    local last
    local t0 = core.now()
    for i = 1, b do last = send("payments", "bench", { n = i }) end
    t_m = t_m + core.now() - t0
    await_ack(last, 300)  -- untimed: let replication catch up

    quiet()
    t_r = t_r + raw("inserts", b, rawsend)[1]

    if conn then
      quiet()
      t0 = core.now()
      local id
      for i = 1, b do
        local cur = check(conn:execute(
          ("insert into public.raw_out (type, data) values ('bench', '{\"n\": %d}') returning id"):format(i)))
        id = cur:fetch()
        cur:close()
      end
      t_l = t_l + core.now() - t0
      local deadline = core.now() + 300
      while not sql(rawsend, "select 1 as x from public.raw_ack where id = $1::uuid", id)[1] do
        if core.now() > deadline then error("luasql sends: no ack after 300 s") end
        core.sleep(0.01)
      end
    end
  end
  R.sends, R.raw_sends = b * ROUNDS / t_m, b * ROUNDS / t_r
  if conn then
    conn:close()
    env:close()
    R.luasql_sends = b * ROUNDS / t_l
  else
    R.luasql_sends = "n/a (luasql.postgres not loadable: " .. tostring(luasql):match("^[^\n]*") .. ")"
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

local function fingerprint(s)
  local parts = {}
  for _, side in ipairs { "store", "payments" } do
    local names = {}
    for name in pairs(s[side].rel) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
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
    if #v == 4 then marks[#marks + 1] = { count = v[1], t = v[2], rss = v[3], heap = v[4] } end
  end
  f:close()
  return marks
end

local function count(ci, rel)
  return sql(ci, "select count(*)::int8 as n from " .. rel)[1].n
end

-- 3 and 5: a batch of n messages in one transaction, with a no-op listener running.
-- Gives up at `deadline` (core.now() time) and reports how far it got.
local function msgbus_batch(n, stops, deadline)
  quiet(("batch %d"):format(n))
  local before = settled()
  local seen0 = count(payments.conninfo, "msgbus.seen")
  local markfile = ("%s/marks-%d"):format(tmpdir, n)
  local l = listener_spawn("batch", payments.conninfo, markfile, table.unpack(stops))
  local last
  local t0 = core.now()
  check(sbus:transaction(function()
    for i = 1, n do last = check(send("payments", "bench", { n = i })) end
  end))
  local tc = core.now()
  local res = { n = n, send = tc - t0, before = before, tc = tc }
  -- wait for the ack in short slices, noting meanwhile when the receiver's apply
  -- committed (the last id in msgbus.seen: an index lookup, to within 50 ms)
  while true do
    if not res.deliver and sql(payments.conninfo, "select 1 as x from msgbus.seen where id = $1::uuid", last)[1] then
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
    res.n_acked = n - count(store.conninfo, "msgbus.to_payments")
    res.n_delivered = count(payments.conninfo, "msgbus.seen") - seen0
    res.n_consumed = res.n_delivered - count(payments.conninfo, "msgbus.inbox")
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
  log("5. batch of %d (small backlog), no-op listener running", N.small)
  R.small = msgbus_batch(N.small, { 1, 1 + w, N.small }, BUDGET_END)
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
  local left = BUDGET_END - core.now() - 10
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
  log("3. batch of %d in one transaction, no-op listener running (gives up after %.0f s)",
    N.big, BUDGET_END - core.now())
  R.big = msgbus_batch(N.big, stops, BUDGET_END)
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
local function k(n) return n >= 1000 and (("%gk"):format(n / 1000)) or tostring(n) end

local function scans_table(b)
  local srows = {}
  for _, side in ipairs { "store", "payments" } do
    local names = {}
    for name in pairs(b.after[side].rel) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
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
    local names = {}
    for name in pairs(b.after[side].fn) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
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
  local big, rb, s = R.big, R.raw_big, R.small
  local bn = k(big.n)
  local why_ack = not big.ack and ("n/a: gave up after %.0f s, %d of %d acked"):format(big.gave_up, big.n_acked, big.n)
  local why_con = not big.consumed and ("n/a: gave up after %.0f s, %d of %d delivered, %d consumed")
    :format(big.gave_up, big.n_delivered, big.n, big.n_consumed)
  local why_all = why_ack or why_con
  row(("3. batch %s: send in one transaction [raw: INSERTs into plain table]"):format(bn), big.send, rb.send, "s")
  row(("3. batch %s: commit -> all in the receiver's inbox [raw: commit -> subscriber has all rows]"):format(bn),
      big.deliver or ("n/a: not delivered after %.0f s"):format(big.gave_up), rb.deliver, "s")
  row(("3. batch %s: commit -> all acked [raw: commit -> subscriber has all rows]"):format(bn),
      big.ack or why_ack, rb.deliver, "s")
  row(("3. batch %s: commit -> all consumed by no-op listener [raw: same]"):format(bn),
      big.consumed or why_con, rb.deliver, "s")
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
  -- from the moment the batch was in the inbox to the end of the (1+w)th handler
  local function window(b)
    if not (b.by[1 + w] and b.deliver) then return "n/a: fewer than " .. (1 + w) .. " consumed" end
    return us((b.by[1 + w].t - (b.tc + b.deliver)) / (1 + w))
  end
  row(("5. consume per msg, first %d at backlog %s [base: backlog %s]"):format(1 + w, bn, k(s.n)),
      window(big), window(s), "µs", "%.1f")
  local m0, m1, m2 = big.by[0], big.by[N.mem_small], big.by[big.n]
  local function rss(m, n) return m and rss_mib(m.rss) or ("n/a: %s messages not consumed"):format(k(n)) end
  row(("6. listener VmRSS after %s msgs [base: when ready]"):format(k(N.mem_small)),
      rss(m1, N.mem_small), rss(m0, 0), "MiB", "%.1f")
  row(("6. listener VmRSS after %s msgs [base: after %s]"):format(bn, k(N.mem_small)),
      rss(m2, big.n), rss(m1, N.mem_small), "MiB", "%.1f")

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
  print(("- sends: %d rounds of %d through each of bus:send, libpq and luasql"):format(ROUNDS, N.sends // ROUNDS))
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
      print(("  the first message was handled %.3f s after the batch was in the inbox"):format(b.by[1].t - b.tc - b.deliver))
    end
    if #seg > 0 then
      print("  consume cost along the way, µs per message: " .. table.concat(seg, ", "))
    end
  end
  print(("- batch %s (the fill of figure 4, no listener): msgbus send %.3f s, ack %.3f s; raw send %.3f s, ack %.3f s")
    :format(k(N.consume), R.fill.send, R.fill.ack, R.raw_fill.send, R.raw_fill.ack))
  local mem = {}
  for _, m in ipairs(big.marks) do
    mem[#mem + 1] = ("%s: %.1f (heap %.2f)"):format(k(m.count), rss_mib(m.rss), m.heap / 1024)
  end
  print("- listener of the big batch, VmRSS MiB (Lua heap MiB) after N messages: " .. table.concat(mem, ", "))
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
    local names = {}
    for name in pairs(R.fn4.after[side]) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local a, b = R.fn4.after[side][name], R.fn4.before[side][name]
      local calls = a.calls - (b and b.calls or 0)
      if calls > 0 then
        local tot = a.total_time - (b and b.total_time or 0)
        frows[#frows + 1] = { side .. " " .. name, tostring(calls), ("%.0f"):format(tot), ("%.1f"):format(tot * 1000 / calls) }
      end
    end
  end
  print(fmt_table(frows, { "function", "calls", "total ms", "µs/call" }))

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
  for _, c in pairs(admin) do c:close() end
  if sbus then sbus:close() end
  if rbus then rbus:close() end
  cluster.destroy_all()
  if tmpdir and tmpdir:match("/msgbus%-bench%.%w+$") then os.execute("rm -rf " .. q(tmpdir)) end
end

local ok, err = xpcall(function()
  log("sizes: latency %d, sends %d, consume %d, batches %d and %d, memory at %d and %d (BENCH_SCALE=%g)",
    N.latency, N.sends, N.consume, N.small, N.big, N.mem_small, N.big, SCALE)
  tmpdir = build_raw()
  setup()
  sbus = check(msgbus.connect(store.conninfo))
  rbus = check(msgbus.connect(payments.conninfo))
  R.pg_version = sql(store.conninfo, "select current_setting('server_version') as v")[1].v
  R.cores = sh("nproc"):gsub("%s+$", "")
  phase_latency()
  phase_sends()
  phase_consume()
  phase_batches()
  if R.big.ack then reap() end
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
