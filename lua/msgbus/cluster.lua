-- msgbus.cluster: throwaway local PostgreSQL clusters for the specs, the demo, the
-- benchmarks and `msgbus dev`. Each cluster lives in its own fresh folder, listens on
-- 127.0.0.1 only (no Unix socket, so long temp paths cannot break it) and has
-- wal_level = logical. As root, initdb/pg_ctl run as the `postgres` system user,
-- because PostgreSQL refuses to run as root; psql connects over TCP as anyone.
--
-- For network fault tests, M.start{ netns = "ns", host = "10.0.0.2" } runs the server
-- inside network namespace `ns` (`ip netns exec`, so root only) as its own host: it
-- listens on `host` (or on the comma-separated `listen_addresses`, e.g. a management
-- address and a second link), conninfo() gives `host`, and pg_hba.conf also admits
-- the namespace's directly connected subnets (`samenet`). The caller makes the
-- namespace and its links, and the test process must be able to reach `host`.
local ok_socket, socket = pcall(require, "socket")

local M = {}

local PREFIX = "msgbus.cluster: "
local SUPERUSER = "postgres"
local HOST = "127.0.0.1"
local START_TRIES = 10

local registry = {}   -- clusters started by this process, in start order

local function shell_quote(s)
  return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end
M.shell_quote = shell_quote

-- Runs a shell command; returns success, combined stdout+stderr.
local function run(cmd)
  -- `make asan` preloads the sanitizer runtime into the Lua process; PostgreSQL's
  -- programs must not inherit it (postgres -V hangs under it)
  local p = io.popen("unset LD_PRELOAD; ( " .. cmd .. " ) 2>&1", "r")
  if not p then return false, "could not run: " .. cmd end
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

local function sleep(s)
  if ok_socket then socket.sleep(s) else os.execute("sleep " .. s) end
end

local function now()
  return ok_socket and socket.gettime() or os.time()
end

local function read_file(path, from)
  local f = io.open(path, "rb")
  if not f then return nil end
  if from then f:seek("set", from) end
  local s = f:read("a")
  f:close()
  return s
end

M.read_file = read_file

local function write_file(path, text)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(text)
  f:close()
  return true
end

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

-- Facts about this machine, looked up once.
local is_root, bindir
local function env_setup()
  if is_root == nil then
    local _, uid = run("id -u")
    is_root = trim(uid) == "0"
  end
  if not bindir then
    bindir = os.getenv("MSGBUS_PG_BINDIR")
    if not bindir then
      local ok, out = run("pg_config --bindir")
      if ok and trim(out) ~= "" then bindir = trim(out) end
    end
    if not bindir then
      local ok, out = run("ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1")
      if ok and trim(out) ~= "" then bindir = trim(out) end
    end
    if not bindir or not read_file(bindir .. "/pg_ctl") then
      return nil, PREFIX .. "PostgreSQL server binaries not found (install postgresql, "
        .. "or set MSGBUS_PG_BINDIR to the folder holding initdb and pg_ctl)"
    end
  end
  return true
end

-- A server program, run as the postgres user when we are root, from `dir`
-- (the postgres user may not be allowed into the caller's working directory), in
-- network namespace `netns` if given (pg_ctl start: the postmaster and its children
-- then live there; stopping is by signals and works from anywhere).
local function server_cmd(dir, prog, args, netns)
  local parts = { "cd", shell_quote(dir), "&&" }
  if netns then parts[#parts + 1] = "ip netns exec " .. shell_quote(netns) end
  if is_root then parts[#parts + 1] = "runuser -u " .. SUPERUSER .. " --" end
  parts[#parts + 1] = shell_quote(bindir .. "/" .. prog)
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  return table.concat(parts, " ")
end

local function free_port()
  if ok_socket then
    local s = socket.tcp()
    if s and s:bind(HOST, 0) then
      local _, port = s:getsockname()
      s:close()
      if tonumber(port) then return tonumber(port) end
    end
  end
  return math.random(20000, 60000)
end

local function port_accepts(host, port)
  if not ok_socket then return false end
  local s = socket.tcp()
  s:settimeout(1)
  local ok = s:connect(host, port)
  s:close()
  return ok ~= nil
end

-- The fields of /proc/<pid>/stat that follow the command name, as strings: [1] the
-- state letter, [12] utime, [13] stime, [14] cutime, [15] cstime (clock ticks), [20]
-- the start time; nil when there is no such process.
local function proc_stat(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  local rest = stat and stat:match("^%d+ %b() (.*)$")
  if not rest then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  return f
end

M.proc_stat = proc_stat

-- This process's pid (Lua has none to give; /proc/self opened by io.open is this
-- process, with no shell in between).
function M.self_pid()
  return tonumber((read_file("/proc/self/stat") or ""):match("^%d+"))
end

-- True while the process exists and is not a zombie.
local function process_alive(pid)
  local f = proc_stat(pid)
  if f then return f[1] ~= "Z" end
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

M.process_alive = process_alive

local function conf_value(v)
  if type(v) == "number" or type(v) == "boolean" then return tostring(v) end
  return "'" .. tostring(v):gsub("'", "''") .. "'"
end

local Cluster = {}
Cluster.__index = Cluster
Cluster.__tostring = function(c)
  return ("msgbus.cluster %s (%s:%d, %s)"):format(c.name, c.host, c.port, c.dir)
end

function Cluster:conninfo(dbname)
  return ("host=%s port=%d dbname=%s user=%s"):format(self.host, self.port, dbname or "postgres", self.superuser)
end

function Cluster:log(n)
  n = n or 50
  local text = read_file(self.logfile) or ""
  local lines = {}
  for line in text:gmatch("[^\n]*") do lines[#lines + 1] = line end
  if lines[#lines] == "" then lines[#lines] = nil end
  return table.concat(lines, "\n", math.max(1, #lines - n + 1), #lines)
end

function Cluster:_fail(what, out, log_from)
  local log = log_from and read_file(self.logfile, log_from) or self:log(30)
  return nil, ("%s%s for cluster %s (port %d): %s\n--- server log %s ---\n%s"):format(
    PREFIX, what, self.name, self.port, trim(out or ""), self.logfile, trim(log or ""))
end

-- postgresql.conf is initdb's text plus our block; rewritten whole when the port changes.
function Cluster:_write_conf()
  local lines = {
    "", "# msgbus.cluster",
    "listen_addresses = '" .. self.listen_addresses .. "'",
    "port = " .. self.port,
    "unix_socket_directories = ''",
    "wal_level = logical",
    "max_replication_slots = 32",
    "max_wal_senders = 32",
    "max_logical_replication_workers = 32",
    "max_worker_processes = 48",
    "max_connections = 100",
    "logging_collector = off",
    "log_min_messages = warning",
    "shared_buffers = 64MB",
    "password_encryption = scram-sha-256",
  }
  local names = {}
  for k in pairs(self.settings) do
    if type(k) == "string" then names[#names + 1] = k end
  end
  table.sort(names)
  for _, k in ipairs(names) do lines[#lines + 1] = k .. " = " .. conf_value(self.settings[k]) end
  for _, line in ipairs(self.settings) do lines[#lines + 1] = line end  -- raw lines, in order
  local ok, err = write_file(self.datadir .. "/postgresql.conf", self._base_conf .. table.concat(lines, "\n") .. "\n")
  if not ok then return nil, PREFIX .. "cannot write postgresql.conf: " .. tostring(err) end
  return true
end

function Cluster:_pid()
  local pidfile = read_file(self.datadir .. "/postmaster.pid")
  return pidfile and tonumber(pidfile:match("^%s*(%d+)"))
end

-- Not `pg_ctl status`: it counts a killed postmaster that is still a zombie (not yet
-- reaped by init, which in some containers takes a second) as running.
function Cluster:running()
  local pid = self:_pid()
  return pid ~= nil and process_alive(pid)
end

-- Returns true | nil, err, log_text_of_this_attempt
function Cluster:start()
  if self:running() then return true end
  -- A zombie postmaster passes the server's own "is that PID alive" check and would
  -- block the start; it holds nothing, so its pid file is stale.
  local pid = self:_pid()
  if pid and read_file("/proc/" .. pid .. "/stat") then os.remove(self.datadir .. "/postmaster.pid") end
  local f = io.open(self.logfile, "rb")
  local log_from = f and f:seek("end") or 0
  if f then f:close() end
  local ok, out = run(server_cmd(self.dir, "pg_ctl",
    { "start", "-w", "-t", "60", "-D", self.datadir, "-l", self.logfile }, self.netns))
  if ok then return true end
  local _, err = self:_fail("pg_ctl start failed", out, log_from)
  return nil, err, (read_file(self.logfile, log_from) or "") .. out
end

function Cluster:stop(mode)
  if not self:running() then return true end
  local ok, out = run(server_cmd(self.dir, "pg_ctl", { "stop", "-w", "-t", "60", "-D", self.datadir, "-m", mode or "fast" }))
  if ok then return true end
  return self:_fail("pg_ctl stop failed", out)
end

function Cluster:restart()
  local ok, err = self:stop("fast")
  if not ok then return nil, err end
  return self:start()
end

-- SIGKILL the postmaster and every child, as a crash or power loss would.
-- The postmaster is stopped first so it cannot fork new children meanwhile.
function Cluster:kill9()
  local pid = self:_pid()
  if pid and process_alive(pid) then
    os.execute("kill -STOP " .. pid .. " 2>/dev/null")
    local _, children = run("pgrep -P " .. pid)
    local pids = { pid }
    for child in children:gmatch("%d+") do pids[#pids + 1] = tonumber(child) end
    os.execute("pkill -9 -P " .. pid .. " 2>/dev/null")  -- status 1 just means no children
    if os.execute("kill -9 " .. pid) ~= true then
      return nil, PREFIX .. "kill -9 " .. pid .. " failed for cluster " .. self.name
    end
    local deadline = now() + 15
    while true do
      local alive
      for _, p in ipairs(pids) do if process_alive(p) then alive = p break end end
      if not alive and not port_accepts(self.host, self.port) then break end
      if now() > deadline then
        return nil, PREFIX .. "cluster " .. self.name .. " still alive 15 s after kill -9 (pid "
          .. tostring(alive or pid) .. ")"
      end
      sleep(0.02)
    end
  end
  return true
end

function Cluster:psql(sql, dbname)
  local tmp = os.tmpname()
  local errfile = os.tmpname()
  local ok, err = write_file(tmp, sql)
  if not ok then
    os.remove(tmp); os.remove(errfile)
    return nil, PREFIX .. "cannot write temp file: " .. tostring(err)
  end
  local psql = bindir .. "/psql"
  if not read_file(psql) then psql = "psql" end
  local cmd = ("unset LD_PRELOAD; PGCONNECT_TIMEOUT=10 %s -X -q -A -t -v ON_ERROR_STOP=1 -d %s -f %s 2>%s"):format(
    shell_quote(psql), shell_quote(self:conninfo(dbname)), shell_quote(tmp), shell_quote(errfile))
  local p = io.popen(cmd, "r")
  local out = p and p:read("a")
  local done = p and p:close()
  local stderr = read_file(errfile) or ""
  os.remove(tmp); os.remove(errfile)
  if done == true then return out end
  return nil, PREFIX .. "psql failed on cluster " .. self.name .. ": " .. trim(stderr)
end

function Cluster:createdb(name)
  local sql = 'create database "' .. name:gsub('"', '""') .. '"'
  local ok, err = self:psql(sql)
  if ok or (err and err:find("already exists", 1, true)) then return true end
  return nil, err
end

function Cluster:destroy()
  if self._destroyed then return true end
  if self:running() and not self:stop("immediate") then self:kill9() end
  for i, c in ipairs(registry) do
    if c == self then table.remove(registry, i) break end
  end
  self._destroyed = true
  -- only ever the folder mktemp made for us
  if not self.dir:match("/msgbus%-[%w_%-]+%.%w+$") then
    return nil, PREFIX .. "refusing to remove " .. self.dir
  end
  local ok, out = run("rm -rf " .. shell_quote(self.dir))
  if not ok then return nil, PREFIX .. "rm -rf " .. self.dir .. " failed: " .. trim(out) end
  return true
end

function M.start(opts)
  opts = opts or {}
  local name = opts.name or "pg"
  assert(type(name) == "string", "msgbus.cluster.start: name must be a string")
  assert(opts.port == nil or math.type(opts.port) == "integer", "msgbus.cluster.start: port must be an integer")
  assert(opts.netns == nil or (type(opts.netns) == "string" and type(opts.host) == "string"),
    "msgbus.cluster.start: netns needs a name and the host address the server listens on there")
  local settings = opts.settings or {}
  for k in pairs(settings) do
    assert(math.type(k) == "integer" or (type(k) == "string" and k:match("^[%a_][%w_.]*$")),
      "msgbus.cluster.start: bad setting name " .. tostring(k))
  end
  local ok, err = env_setup()
  if not ok then return nil, err end
  if opts.netns and not is_root then return nil, PREFIX .. "netns needs root (ip netns exec)" end

  local base = opts.base or os.getenv("TMPDIR") or "/tmp"
  if opts.base then
    local mk, out = run("mkdir -p " .. shell_quote(base))
    if not mk then return nil, PREFIX .. "cannot create " .. base .. ": " .. trim(out) end
  end
  local label = name:gsub("[^%w_]", "_")
  local made, dir = run("mktemp -d " .. shell_quote(base .. "/msgbus-" .. label .. ".XXXXXX"))
  if not made then return nil, PREFIX .. "mktemp failed in " .. base .. ": " .. trim(dir) end
  dir = trim(dir)

  local c = setmetatable({
    name = name, dir = dir, datadir = dir .. "/data", logfile = dir .. "/server.log",
    host = opts.host or HOST, superuser = SUPERUSER, port = opts.port or free_port(), settings = settings,
    netns = opts.netns, listen_addresses = opts.listen_addresses or opts.host or HOST,
  }, Cluster)
  registry[#registry + 1] = c

  local function fail(msg)
    c:destroy()
    return nil, msg
  end

  if is_root then
    local chown, out = run("chmod 0755 " .. shell_quote(dir) .. " && chown -R " .. SUPERUSER .. " " .. shell_quote(dir))
    if not chown then return fail(PREFIX .. "cannot hand " .. dir .. " to user " .. SUPERUSER .. ": " .. trim(out)) end
    if not run("runuser -u " .. SUPERUSER .. " -- test -w " .. shell_quote(dir)) then
      return fail(PREFIX .. "user " .. SUPERUSER .. " cannot reach " .. dir .. " (make its parent folders mode 0755)")
    end
  end

  local init, out = run(server_cmd(dir, "initdb", { "-D", c.datadir, "-U", SUPERUSER, "-N", "-E", "UTF8",
    "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256" }))
  if not init then return fail(PREFIX .. "initdb failed for cluster " .. name .. ": " .. trim(out)) end

  local hba = {
    "# msgbus.cluster: TCP only; replication connections match on database name",
    "host all " .. SUPERUSER .. " 127.0.0.1/32 trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all " .. SUPERUSER .. " ::1/128 trust",
    "host all all ::1/128 scram-sha-256" }
  if c.netns then  -- the namespace's own links: the test host and the peer servers
    hba[#hba + 1] = "host all " .. SUPERUSER .. " samenet trust"
    hba[#hba + 1] = "host all all samenet scram-sha-256"
  end
  hba = table.concat(hba, "\n") .. "\n"
  local wrote, werr = write_file(c.datadir .. "/pg_hba.conf", hba)
  if not wrote then return fail(PREFIX .. "cannot write pg_hba.conf: " .. tostring(werr)) end
  c._base_conf = read_file(c.datadir .. "/postgresql.conf") or ""

  for try = 1, START_TRIES do
    ok, err = c:_write_conf()
    if not ok then return fail(err) end
    local started, serr, log = c:start()
    if started then return c end
    local busy = log:find("could not bind", 1, true) or log:find("Address already in use", 1, true)
      or log:find("could not create any TCP/IP sockets", 1, true)
    if not busy or opts.port or try == START_TRIES then return fail(serr) end
    c.port = free_port()
  end
end

-- Keep this cluster running after this process ends: destroy_all and the exit
-- hook leave it alone (for `msgbus dev up`).
function Cluster:detach()
  for i, c in ipairs(registry) do
    if c == self then table.remove(registry, i) break end
  end
  return self
end

function M.destroy_all()
  local ok, err = true, nil
  for i = #registry, 1, -1 do
    local c = registry[i]
    if c then
      local done, derr = c:destroy()
      if not done then ok, err = nil, derr end
    end
  end
  return ok, err
end

-- Best effort at exit: finalizers run when the Lua state closes (a normal end of the
-- script, or os.exit(code, true) as busted does).
M._sentinel = setmetatable({}, { __gc = function() pcall(M.destroy_all) end })

return M
