-- The msgbus command (bin/msgbus), run as a real process against real clusters.
local msgbus = require "msgbus"
local cluster = require "msgbus.cluster"
local core = require "msgbus.core"
local env = require "helpers.env"

local q = cluster.shell_quote
local UUID = "^%x+%-%x+%-%x+%-%x+%-%x+$"

local function command_line(args, vars)
  local parts = { "env -u MSGBUS_DB", "LUA_PATH=" .. q(package.path), "LUA_CPATH=" .. q(package.cpath) }
  for k, v in pairs(vars or {}) do parts[#parts + 1] = k .. "=" .. q(v) end
  parts[#parts + 1] = "lua5.4 bin/msgbus"
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end

-- Runs `msgbus args...`; returns the exit code, stdout and stderr.
local function msgbus_cmd(args, vars)
  local errfile = os.tmpname()
  local p = assert(io.popen(command_line(args, vars) .. " 2>" .. q(errfile), "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  local f = assert(io.open(errfile, "rb"))
  local err = f:read("a")
  f:close()
  os.remove(errfile)
  return code, out, err
end

-- Starts `msgbus args...` and returns its stdout as a pipe (stderr is folded in).
local function msgbus_spawn(args)
  return assert(io.popen(command_line(args) .. " 2>&1", "r"))
end

local function lines(text)
  local t = {}
  for line in text:gmatch("[^\n]+") do t[#t + 1] = line end
  return t
end

local function count(svc, sql, ...)
  return env.scalar(svc, "select count(*)::int8 from " .. sql, ...)
end

-- pg_subscription and pg_replication_slots are per cluster; other specs share them
local SUBS = "pg_subscription where subdbid = (select oid from pg_database where datname = current_database())"
local SLOTS = "pg_replication_slots where database = current_database()"

local function exists(path)
  return os.execute("test -e " .. q(path)) == true
end

-- True while the process exists and is not a zombie (init may be slow to reap it).
local function process_alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

describe("msgbus command", function()
  it("prints help and exits 0 for itself and every subcommand", function()
    for _, cmd in ipairs { {}, { "install" }, { "link" }, { "unlink" }, { "status" }, { "send" }, { "tail" },
                           { "dead-letters" }, { "dead-letters", "list" }, { "dead-letters", "retry" },
                           { "dead-letters", "drop" }, { "dev" }, { "dev", "up" }, { "dev", "down" } } do
      local args = { table.unpack(cmd) }
      args[#args + 1] = "--help"
      local code, out, err = msgbus_cmd(args)
      local name = table.concat(cmd, " ")
      assert.equal(0, code, name)
      assert.equal("", err, name)
      assert.matches("^Usage: msgbus" .. (name ~= "" and " " .. name:gsub("%-", "%%-") or "") .. " %[%-h%]", out, nil, name)
      assert.matches("Show this help message and exit", out, 1, true)
    end
  end)

  it("exits 2 with a message on usage errors, before connecting anywhere", function()
    local nowhere = "host=127.0.0.1 port=1 dbname=x connect_timeout=1"
    for _, case in ipairs {
      { { "bogus" }, "unknown command 'bogus'" },
      { { "status" }, "no database: give --db CONNINFO or set MSGBUS_DB" },
      { { "status", "--db", nowhere, "--max-ack-age", "soon" }, '"soon" is not a number of seconds' },
      { { "send", "--db", nowhere, "--to", "p", "--type", "t", "--data", "[1]" }, "--data must be a JSON object" },
      { { "send", "--db", nowhere, "--to", "p", "--type", "t", "--data", "{bad" }, "--data must be a JSON object" },
      { { "send", "--db", nowhere, "--to", "Bad-Name", "--type", "t" }, 'invalid service name "Bad-Name"' },
      { { "send", "--db", nowhere, "--type", "t" }, "missing option '--to'" },
      { { "tail", "--db", nowhere, "--limit", "0" }, '"0" is not a whole number' },
      { { "dead-letters", "--db", nowhere, "retry", "42" }, '"42" is not a message id' },
      { { "dead-letters", "--db", nowhere }, "a command is required" },
      { { "link", "--db", nowhere, "--service", "s", "--peer-db", nowhere, "--peer", "s" }, "cannot link service \"s\" to itself" },
      { { "install", "--db", "host='unterminated", "--service", "s" }, "--db: " },
    } do
      local code, out, err = msgbus_cmd(case[1])
      local name = table.concat(case[1], " ")
      assert.equal(2, code, name)
      assert.equal("", out, name)
      assert.matches(case[2], err, 1, true, name)
      assert.matches("Usage: msgbus", err, 1, true, name)
    end
  end)

  it("exits 1 when the database cannot be reached", function()
    local code, out, err = msgbus_cmd { "status", "--db", "host=127.0.0.1 port=1 dbname=x connect_timeout=1" }
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("^msgbus: .*port 1", err)
  end)
end)

describe("msgbus install, link, send, status, unlink", function()
  local s1, s2 -- { service, conninfo }, installed and linked by the command

  setup(function()
    local suffix = core.random_hex(2)
    s1 = { service = "clia_" .. suffix }
    s2 = { service = "clib_" .. suffix }
    for _, x in ipairs { { s1, "a" }, { s2, "b" } } do
      local c = env.cluster(x[2])
      assert(c:createdb(x[1].service))
      x[1].conninfo = c:conninfo(x[1].service)
    end
  end)

  local function status(svc, ...)
    return msgbus_cmd { "status", "--db", svc.conninfo, ... }
  end

  local function wait_healthy(svc)
    env.wait_until(function() return status(svc) == 0 end, 30, svc.service .. " healthy")
  end

  -- healthy, and every subscription's worker running (not just "starting")
  local function wait_running(svc)
    env.wait_until(function()
      local code, out = status(svc, "--json")
      if code ~= 0 then return false end
      for _, p in ipairs(msgbus.decode(out).peers) do
        if not p.subscription.worker_running then return false end
      end
      return true
    end, 30, svc.service .. "'s workers running")
  end

  it("install makes a database the home of a service, again harmlessly, and refuses another name", function()
    for _, s in ipairs { s1, s2 } do
      local code, out, err = msgbus_cmd { "install", "--db", s.conninfo, "--service", s.service }
      assert.equal(0, code, err)
      assert.equal("installed schema\nservice " .. s.service .. "\n", out)
      assert.equal(s.service, env.scalar(s, "select msgbus.service()"))
    end
    local code, out = msgbus_cmd { "install", "--db", s1.conninfo, "--service", s1.service }
    assert.equal(0, code)
    assert.matches("service " .. s1.service, out)
    local err
    code, out, err = msgbus_cmd { "install", "--db", s1.conninfo, "--service", "someone_else" }
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches('already the service "' .. s1.service .. '"', err, 1, true)
  end)

  local function link_args(cmd)
    return { cmd, "--db", s1.conninfo, "--service", s1.service, "--peer-db", s2.conninfo, "--peer", s2.service }
  end

  it("link --dry-run prints setup.link's SQL calls and changes nothing", function()
    local args = link_args("link")
    args[#args + 1] = "--dry-run"
    local code, out, err = msgbus_cmd(args)
    assert.equal(0, code, err)
    local a, b = s1.service, s2.service
    for _, want in ipairs {
      ("%s: select msgbus.add_peer('%s')"):format(a, b),
      ("%s: select msgbus.add_peer('%s')"):format(b, a),
      ("%s: select msgbus.peer_role('msgbus_%s_%s'"):format(a, a, b),
      ("%s: select pg_create_logical_replication_slot('msgbus_%s_to_%s', 'pgoutput')"):format(a, a, b),
      ("%s: select pg_create_logical_replication_slot('msgbus_%s_to_%s', 'pgoutput')"):format(b, b, a),
      ("%s: select msgbus.subscribe('%s', 'host=127.0.0.1 port=%d dbname=%s user=msgbus_%s_%s"):format(
        b, a, env.cluster("a").port, a, a, b),
      ("%s: select msgbus.subscribe('%s'"):format(a, b),
      ("%s: select msgbus.resend('%s')"):format(a, b),
    } do
      assert.matches(want, out, 1, true)
    end
    assert.equal(0, count(s1, "msgbus.peers"))
    assert.equal(0, count(s2, SUBS))
    assert.equal(0, count(s1, SLOTS))
  end)

  it("link wires both ways, printing a line per step", function()
    local code, out, err = msgbus_cmd(link_args("link"))
    assert.equal(0, code, err)
    local a, b = s1.service, s2.service
    assert.matches(("%s: replication slot msgbus_%s_to_%s\n"):format(a, a, b), out, 1, true)
    assert.matches(("%s: subscription msgbus_%s_to_%s\n"):format(b, a, b), out, 1, true)
    assert.matches(("%s: subscription msgbus_%s_to_%s\n"):format(a, b, a), out, 1, true)
    assert.matches(("linked %s <%%-> %s\n$"):format(a, b), out)
    assert.equal(1, count(s2, "pg_subscription where subname = $1", ("msgbus_%s_to_%s"):format(a, b)))
    assert.equal(1, count(s1, "pg_subscription where subname = $1", ("msgbus_%s_to_%s"):format(b, a)))
    -- right after a link, a worker PostgreSQL has not started yet is "starting",
    -- not a reason to be unhealthy
    for _, svc in ipairs { s1, s2 } do
      local scode, sout = status(svc, "--json")
      assert.equal(0, scode, sout)
      local sub = msgbus.decode(sout).peers[1].subscription
      assert.is_true(sub.worker_running or sub.starting)
    end
  end)

  it("status is healthy: exit 0, a table, and with --json the link's state", function()
    wait_running(s1)
    -- the link's hellos: s2 said it takes one ack row for many messages
    env.wait_until(function()
      return env.scalar(s1, "select batched_acks and packs from msgbus.peers where service = $1", s2.service)
    end, 30, "s2's hello")
    local code, out, err = status(s1)
    assert.equal(0, code, err)
    assert.matches(("service %s: inbox 0, dead letters 0\n"):format(s1.service), out, 1, true)
    assert.matches("\n" .. s2.service .. " +enabled +running .* batched +packs\n", out)
    assert.matches("\nhealthy\n$", out)
    code, out, err = status(s1, "--json")
    assert.equal(0, code, err)
    assert.equal("", err)
    local s = msgbus.decode(out)
    assert.equal(s1.service, s.service)
    assert.is_true(s.healthy)
    assert.equal(0, #s.problems)
    assert.equal(60, s.max_ack_age)
    assert.equal(0, s.inbox)
    assert.equal(0, s.dead_letters)
    assert.equal("always", s.inbox_trigger)
    assert.equal(1, #s.peers)
    local p = s.peers[1]
    assert.equal(s2.service, p.peer)
    assert.same({ "msgbus_" .. s2.service .. "_to_" .. s1.service, true, true, true, 0 },
      { p.subscription.name, p.subscription.exists, p.subscription.enabled, p.subscription.worker_running,
        p.subscription.apply_error_count })
    assert.equal("integer", math.type(p.subscription.worker_pid))
    assert.same({ "msgbus_" .. s1.service .. "_to_" .. s2.service, true, "reserved" },
      { p.slot.name, p.slot.exists, p.slot.wal_status })
    assert.equal("integer", math.type(p.slot.retained_bytes))
    assert.equal(0, p.outbox.depth)
    assert.equal(msgbus.null, p.outbox.oldest_age)
    assert.equal("batched", p.acks)
    assert.equal("packs", p.many)
    -- a peer that has not said hello gets one ack row a message
    -- and one that has not said it unpacks packs gets send_many's messages a row each
    env.exec(s1, "update msgbus.peers set batched_acks = false, packs = false where service = $1", s2.service)
    code, out = status(s1, "--json")
    env.exec(s1, "update msgbus.peers set batched_acks = true, packs = true where service = $1", s2.service)
    assert.equal(0, code, out)
    assert.equal("single", msgbus.decode(out).peers[1].acks)
    assert.equal("rows", msgbus.decode(out).peers[1].many)
  end)

  it("send prints the id and, with --wait-ack, returns once the receiver has it", function()
    local code, out, err = msgbus_cmd { "send", "--db", s1.conninfo, "--to", s2.service, "--type", "greet",
                                        "--data", '{"n":1,"big":9007199254740993}', "--wait-ack", "20" }
    assert.equal(0, code, err)
    local id = out:match("^(%S+)\n$")
    assert.matches(UUID, id)
    assert.equal(0, count(s1, "msgbus.messages where receiver = $1", s2.service))
    local row = env.exec(s2, "select type, sender, data from msgbus.inbox where id = $1", id)[1]
    assert.same({ type = "greet", sender = s1.service, data = { n = 1, big = 9007199254740993 } }, row)
  end)

  it("send --wait-ack exits 1 on timeout, after printing the id", function()
    local sub = ("msgbus_%s_to_%s"):format(s1.service, s2.service)
    env.exec(s2, "alter subscription " .. sub .. " disable")
    local code, out, err = msgbus_cmd { "send", "--db", s1.conninfo, "--to", s2.service, "--type", "held",
                                        "--wait-ack", "0.3" }
    env.exec(s2, "alter subscription " .. sub .. " enable")
    assert.equal(1, code)
    local id = out:match("^(%S+)\n$")
    assert.matches(UUID, id)
    assert.matches("^msgbus: no acknowledgement for " .. id:gsub("%-", "%%-") .. ": timeout", err)
    env.wait_until(function() return count(s2, "msgbus.inbox where id = $1", id) == 1 end, 20, "the held message")
  end)

  it("send refuses a receiver that is not linked with exit 1", function()
    local code, out, err = msgbus_cmd { "send", "--db", s1.conninfo, "--to", "nobody", "--type", "x" }
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches('unknown receiver "nobody"', err, 1, true)
  end)

  it("tail prints the inbox as JSON lines without consuming it; --limit keeps the newest", function()
    local ids = {}
    for _, r in ipairs(env.exec(s2, "select id from msgbus.inbox order by pos")) do ids[#ids + 1] = r.id end
    assert.equal(2, #ids)
    local code, out, err = msgbus_cmd { "tail", "--db", s2.conninfo }
    assert.equal(0, code, err)
    local got = lines(out)
    assert.equal(2, #got)
    for i, line in ipairs(got) do
      local m = msgbus.decode(line)
      assert.equal(ids[i], m.id)
      assert.equal(s1.service, m.sender)
      assert.equal(s2.service, m.receiver)
      assert.is_string(m.sent_at)
      assert.equal(0, m.attempts)
    end
    assert.same({ n = 1, big = 9007199254740993 }, msgbus.decode(got[1]).data)
    assert.equal(2, count(s2, "msgbus.inbox"))
    code, out = msgbus_cmd { "tail", "--db", s2.conninfo, "--limit", "1" }
    assert.equal(0, code)
    got = lines(out)
    assert.equal(1, #got)
    assert.equal(ids[2], msgbus.decode(got[1]).id)
  end)

  it("tail and status show a pack that waits whole as its messages, and once unpacked too", function()
    local bus = env.connect(s2)
    local ids = assert(bus:send_many(s1.service, "packed", { { k = 1 }, { k = 2 }, { k = 3 } }))
    assert.is_true(bus:wait_ack(ids[3], 30))
    bus:close()
    assert.same({ { type = "msgbus.pack", n = 1 } },
      env.exec(s1, "select type, count(*)::int8 as n from msgbus.inbox group by type"))
    local function tail_ids(...)
      local code, out, err = msgbus_cmd { "tail", "--db", s1.conninfo, ... }
      assert.equal(0, code, err)
      local got = {}
      for i, line in ipairs(lines(out)) do
        local m = msgbus.decode(line)
        assert.equal("packed", m.type)
        assert.equal(s2.service, m.sender)
        got[i] = m.id
      end
      return got
    end
    assert.same(ids, tail_ids())
    assert.same({ ids[3] }, tail_ids("--limit", "1"))
    local code, out = msgbus_cmd { "status", "--db", s1.conninfo, "--json" }
    assert.equal(0, code)
    assert.equal(3, msgbus.decode(out).inbox)
    -- one message taken alone unpacks the pack into rows: the other two still show
    local c = assert(core.connect(s1.conninfo))
    assert(c:exec("begin"))
    assert.equal(ids[1], assert(c:exec("select id::text as id from msgbus.claim()"))[1].id)
    assert(c:exec("select msgbus.done($1)", ids[1]))
    assert(c:exec("commit"))
    c:close()
    assert.same({ ids[2], ids[3] }, tail_ids())
    assert.equal(2, count(s1, "msgbus.inbox where type = 'packed'"))
    local b1 = env.connect(s1)
    assert.equal(2, b1:listen(function() end, { max = 2, timeout = 5 }))
    b1:close()
  end)

  it("status exits 3 naming a disabled subscription", function()
    local sub = ("msgbus_%s_to_%s"):format(s2.service, s1.service)
    env.exec(s1, "alter subscription " .. sub .. " disable")
    local code, out = status(s1)
    local jcode, jout, jerr = status(s1, "--json")
    env.exec(s1, "alter subscription " .. sub .. " enable")
    assert.equal(3, code)
    assert.matches(("\nunhealthy:\n  %s: subscription %s is disabled\n"):format(s2.service, sub), out, 1, true)
    assert.equal(3, jcode)
    local s = msgbus.decode(jout)
    assert.is_false(s.healthy)
    assert.is_false(s.peers[1].subscription.enabled)
    assert.same({ ("%s: subscription %s is disabled"):format(s2.service, sub) }, s.problems)
    assert.matches("unhealthy: " .. s2.service .. ": subscription", jerr, 1, true)
    wait_healthy(s1)
  end)

  it("status exits 3 when the inbox trigger would not fire for the apply worker, saying how to mend it", function()
    local inbox = "msgbus.to_" .. s1.service
    -- a plain ENABLE TRIGGER: local only, so the apply worker (a replica) skips it
    env.exec(s1, "alter table " .. inbox .. " enable trigger arrival")
    local code, out = status(s1)
    local jcode, jout = status(s1, "--json")
    local mend = "alter table " .. inbox .. " enable always trigger arrival"
    env.exec(s1, mend)
    assert.equal(3, code)
    assert.matches("\nunhealthy:\n  the inbox trigger is local only: arriving messages are taken unchecked", out)
    assert.matches(mend, out, 1, true)
    assert.equal(3, jcode)
    local s = msgbus.decode(jout)
    assert.equal("local only", s.inbox_trigger)
    assert.is_false(s.healthy)
    wait_healthy(s1)
    -- dropped: the hint recreates it
    env.exec(s1, "drop trigger arrival on " .. inbox)
    code, out = status(s1)
    assert.equal(3, code)
    local fix = out:match("the inbox trigger is missing: .-as the schema's owner: (select msgbus%.arrival_trigger%b())")
    assert.is_string(fix, out)
    env.exec(s1, fix)
    wait_healthy(s1)
    local _, json = status(s1, "--json")
    assert.equal("always", msgbus.decode(json).inbox_trigger)
    -- and it works again: a message from s2 arrives and is acknowledged
    local b2 = env.connect(s2)
    local id = assert(b2:send(s1.service, "after_mend", {}))
    assert.is_true(b2:wait_ack(id, 20))
    b2:close()
    env.exec(s1, "delete from msgbus.inbox")
  end)

  it("status exits 3 naming a session that listens and does not read its notifications", function()
    wait_healthy(s1)
    local code, out = status(s1, "--json")
    assert.equal(0, code, out)
    assert.same({}, msgbus.decode(out).unread_sessions)
    assert.equal("number", type(msgbus.decode(out).notify_queue_usage))
    -- a connection that listens, then is left alone (as a bus that waited once and
    -- is no longer used): its server blocks writing to it once the socket is full
    local idle = assert(core.connect(s1.conninfo))
    assert(idle:exec("listen msgbus_spec_unread"))
    local pid = idle:backend_pid()
    env.exec(s1, [[select pg_notify('msgbus_spec_unread', repeat('x', 7990) || g)
                     from generate_series(1, 3000) g]])
    env.wait_until(function()
      return env.scalar(s1, "select wait_event from pg_stat_activity where pid = $1", pid) == "ClientWrite"
    end, 30, "the listening session to block")
    local tcode, text = status(s1)
    code, out = status(s1, "--json")
    idle:close()
    assert.equal(3, tcode)
    assert.matches("do not read their notifications hold back the server's notification queue", text, 1, true)
    assert.matches("pid " .. pid .. " (a bus that waited once", text, 1, true)
    assert.equal(3, code)
    assert.same({ pid }, msgbus.decode(out).unread_sessions)
    -- once it is closed, the queue drains and the service is healthy again
    wait_healthy(s1)
  end)

  it("repair leaves intact links alone, and rebuilds a missing slot and resends what it had", function()
    local code, out = msgbus_cmd { "repair", "--db", s1.conninfo }
    assert.equal(0, code)
    assert.equal(("%s: every link is intact; nothing to repair\n"):format(s1.service), out)

    local sub = ("msgbus_%s_to_%s"):format(s1.service, s2.service)
    env.exec(s2, "alter subscription " .. sub .. " disable")
    env.wait_until(function()
      return env.scalar(s1, "select not active from pg_replication_slots where slot_name = $1", sub)
    end, 30, "the slot to be let go")
    env.exec(s1, "select pg_drop_replication_slot($1)", sub)
    local bus = env.connect(s1)
    local id = assert(bus:send(s2.service, "after.loss", {}))
    env.exec(s2, "alter subscription " .. sub .. " enable")
    local scode, sout = status(s1)
    assert.equal(3, scode)
    assert.matches(("%s: replication slot %s is missing"):format(s2.service, sub), sout, 1, true)

    code, out = msgbus_cmd { "repair", "--db", s1.conninfo }
    assert.equal(0, code)
    assert.matches(("replication slot %s is lost or missing; rebuilding it\n"):format(sub), out, 1, true)
    assert.matches(("resent 1 unacknowledged message(s) to %s\n"):format(s2.service), out, 1, true)
    assert.is_true(bus:wait_ack(id, 30))
    bus:close()
    assert.equal(1, count(s2, "msgbus.inbox where id = $1", id))
    wait_healthy(s1)
  end)

  it("status exits 3 when a message waits for its ack longer than --max-ack-age", function()
    local sub = ("msgbus_%s_to_%s"):format(s1.service, s2.service)
    env.exec(s2, "alter subscription " .. sub .. " disable")
    local code = msgbus_cmd { "send", "--db", s1.conninfo, "--to", s2.service, "--type", "late" }
    assert.equal(0, code)
    local out
    env.wait_until(function()
      code, out = status(s1, "--max-ack-age", "0.2")
      return code == 3
    end, 10, "status to see the old message")
    assert.matches(s2.service .. ": the oldest unacknowledged message is %d+%.%ds old %(limit 0%.2s%)", out)
    assert.matches("\n" .. s2.service .. " .* 1 +%d+%.%ds +batched +packs\n", out)
    -- young enough for the default limit
    assert.equal(0, (status(s1)))
    env.exec(s2, "alter subscription " .. sub .. " enable")
    env.wait_until(function() return count(s1, "msgbus.messages where receiver = $1", s2.service) == 0 end, 20, "ack")
  end)

  it("unlink refuses while messages are unacknowledged, then --force removes the link", function()
    local sub = ("msgbus_%s_to_%s"):format(s1.service, s2.service)
    env.exec(s2, "alter subscription " .. sub .. " disable")
    assert.equal(0, (msgbus_cmd { "send", "--db", s1.conninfo, "--to", s2.service, "--type", "doomed" }))
    local code, out, err = msgbus_cmd(link_args("unlink"))
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("not acknowledged", err, 1, true)
    assert.equal(1, count(s2, "pg_subscription where subname = $1", sub))
    local args = link_args("unlink")
    args[#args + 1] = "--force"
    code, out, err = msgbus_cmd(args)
    assert.equal(0, code, err)
    assert.matches(("%s: dropped subscription %s\n"):format(s2.service, sub), out, 1, true)
    assert.matches(("unlinked %s <%%-> %s\n$"):format(s1.service, s2.service), out)
    assert.equal(0, count(s2, SUBS))
    assert.equal(0, count(s1, SUBS))
    assert.equal(0, count(s1, SLOTS))
    code, out = status(s1)
    assert.equal(0, code)
    assert.matches("\nno peers linked\nhealthy\n$", out)
  end)
end)

describe("msgbus tail --follow and dead-letters", function()
  local f1, f2, fb1

  setup(function()
    f1, f2 = env.linked({ "fa", "fb" }, { "a", "b" })
    fb1 = env.connect(f1)
  end)

  teardown(function()
    fb1:close()
  end)

  local function send_and_wait(mtype)
    local id = assert(fb1:send(f2.service, mtype, { t = mtype }))
    assert.is_true(fb1:wait_ack(id, 20))
    return id
  end

  -- Dead-letter everything in f2's inbox: a handler that always fails, one attempt.
  local function kill_inbox()
    local bus = env.connect(f2, { max_attempts = 1 })
    bus:listen(function(m) error("cannot handle " .. m.type) end, { timeout = 0 })
    bus:close()
  end

  it("follows new arrivals, also one committed after a later one", function()
    local dead = send_and_wait("dead")
    kill_inbox()
    assert.equal(0, count(f2, "msgbus.inbox"))
    local first = send_and_wait("first")
    local tail = msgbus_spawn { "tail", "--db", f2.conninfo, "--follow", "--timeout", "5" }
    finally(function() pcall(tail.close, tail) end)
    -- the first line shows it has looked (and listens)
    assert.equal(first, msgbus.decode(tail:read("l")).id)
    -- a redelivery takes its inbox position now and commits after the next arrival
    local conn = assert(core.connect(f2.conninfo))
    assert(conn:exec("begin"))
    assert.is_true(assert(conn:exec("select msgbus.redeliver($1) as ok", dead))[1].ok)
    local later = send_and_wait("later")
    assert.equal(later, msgbus.decode(tail:read("l")).id)
    assert(conn:exec("commit"))
    conn:close()
    local m = msgbus.decode(tail:read("l"))
    assert.equal(dead, m.id)
    assert.same({ t = "dead" }, m.data)
    -- nothing else, and it stops after --timeout with nothing new
    local t0 = core.now()
    assert.equal("", tail:read("a"))
    assert.is_true(core.now() - t0 > 3)
    local _, _, code = tail:close()
    assert.equal(0, code)
    assert.equal(3, count(f2, "msgbus.inbox"))
    kill_inbox()
  end)

  it("dead-letters lists, retries and drops", function()
    local code, out, err = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "list", "--json" }
    assert.equal(0, code, err)
    local listed = {}
    for _, line in ipairs(lines(out)) do
      local d = msgbus.decode(line)
      assert.equal("failed", d.reason)
      assert.equal(1, d.attempts)
      assert.matches("cannot handle " .. d.type, d.last_error, 1, true)
      listed[#listed + 1] = d.id
    end
    assert.equal(3, #listed)
    assert.equal(3, count(f2, "msgbus.dead_letters"))
    local one, two = listed[1], listed[2]

    code, out = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "list" }
    assert.equal(0, code)
    assert.matches("^ID +SENDER +TYPE +ATTEMPTS +REASON +DIED AT +LAST ERROR\n", out)
    assert.matches(one .. "  " .. f1.service, out, 1, true)
    assert.equal(4, #lines(out))

    code, out, err = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "retry", one }
    assert.equal(0, code, err)
    assert.equal("redelivered " .. one .. "\n", out)
    assert.equal(1, count(f2, "msgbus.inbox where id = $1", one))
    assert.equal(0, count(f2, "msgbus.dead_letters where id = $1", one))
    code, out, err = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "retry", one }
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("no dead letter " .. one, err, 1, true)

    code, out, err = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "--json", "drop", two }
    assert.equal(0, code, err)
    assert.same({ id = two, dropped = true }, msgbus.decode(out))
    assert.equal(0, count(f2, "msgbus.dead_letters where id = $1", two))
    code = msgbus_cmd { "dead-letters", "--db", f2.conninfo, "drop", two }
    assert.equal(1, code)
    assert.equal(1, count(f2, "msgbus.dead_letters"))

    -- the retried one is handled like any other message
    local got
    local bus = env.connect(f2)
    assert.equal(1, bus:listen(function(m) got = m.id end, { max = 1, timeout = 5 }))
    bus:close()
    assert.equal(one, got)
  end)
end)

describe("msgbus dev", function()
  it("up starts linked services that outlive the command; down removes everything", function()
    local dir = (os.getenv("MSGBUS_TEST_DIR") or "/tmp") .. "/dev_" .. core.random_hex(3)
    finally(function()
      if exists(dir) then msgbus_cmd { "dev", "down", "--dir", dir } end
    end)
    local code, out, err = msgbus_cmd { "dev", "up", "--dir", dir, "--services", "shop,bank" }
    assert.equal(0, code, err)
    local f = assert(io.open(dir .. "/msgbus-dev.json"))
    local state = msgbus.decode(f:read("a"))
    f:close()
    assert.equal(2, #state.clusters)
    local shop, bank = state.clusters[1], state.clusters[2]
    assert.same({ "shop", "bank" }, { shop.service, bank.service })
    for _, c in ipairs(state.clusters) do
      assert.equal(("host=127.0.0.1 port=%d dbname=%s user=postgres"):format(c.port, c.service), c.conninfo)
      assert.matches("\n" .. c.service .. " +" .. c.conninfo:gsub("%p", "%%%0") .. "\n", out)
      assert.is_true(exists(c.datadir .. "/postmaster.pid"))
    end
    assert.matches("linked shop <-> bank\n", out, 1, true)

    -- the servers run after `dev up` exited, linked and healthy
    for _, c in ipairs(state.clusters) do
      env.wait_until(function()
        return msgbus_cmd { "status", "--db", c.conninfo } == 0
      end, 30, c.service .. " healthy")
    end
    code, out, err = msgbus_cmd { "send", "--db", shop.conninfo, "--to", "bank", "--type", "hello", "--wait-ack", "20" }
    assert.equal(0, code, err)
    assert.equal(1, count(bank, "msgbus.inbox where id = $1", out:match("%S+")))

    code, out, err = msgbus_cmd { "dev", "up", "--dir", dir }
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("already up", err, 1, true)

    local pids = {}
    for _, c in ipairs(state.clusters) do
      local pf = assert(io.open(c.datadir .. "/postmaster.pid"))
      pids[#pids + 1] = tonumber(pf:read("l"))
      pf:close()
    end
    code, out, err = msgbus_cmd { "dev", "down", "--dir", dir }
    assert.equal(0, code, err)
    assert.matches("removed " .. dir, out, 1, true)
    assert.is_false(exists(dir))
    for _, pid in ipairs(pids) do
      assert.is_false(process_alive(pid), "postmaster " .. pid .. " still running")
    end
    local conn = core.connect(shop.conninfo .. " connect_timeout=2")
    assert.is_nil(conn)
    code, out = msgbus_cmd { "dev", "down", "--dir", dir }
    assert.equal(0, code)
    assert.matches("nothing to stop", out, 1, true)
  end)
end)
