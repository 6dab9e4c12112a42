-- Any SQL client can take part: one service is driven by psql alone (no msgbus Lua
-- code on its side) and talks both ways with a Lua service.
local core = require "msgbus.core"
local env = require "helpers.env"

local function sh(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Run SQL through psql as `user` (a login role with a password) on svc's database;
-- returns the output, or nil and psql's error text.
local function psql(svc, sql, user, password)
  local c = svc.cluster
  local cmd = ("unset LD_PRELOAD; PGPASSWORD=%s psql -X -q -A -t -v ON_ERROR_STOP=1 -h %s -p %d -U %s -d %s -c %s 2>&1")
    :format(sh(password or ""), c.host, c.port, sh(user or "postgres"), sh(svc.service), sh(sql))
  local p = io.popen(cmd, "r")
  local out = p:read("a")
  local ok = p:close()
  if not ok then return nil, out end
  return (out:gsub("%s+$", ""))
end

describe("the SQL API", function()
  local sq, lx, bus, app_pw

  setup(function()
    -- sq: the psql-driven service; lx: a Lua service
    sq, lx = env.linked({ "sq", "lx" }, { "a", "b" })
    bus = env.connect(lx)
    app_pw = core.random_hex(12)
    -- the application's login role: a member of msgbus_<service>_app, nothing more
    assert(psql(sq, ("create role sq_app login password '%s'; grant msgbus_%s_app to sq_app")
      :format(app_pw, sq.service)))
  end)

  teardown(function() bus:close() end)

  local function as_app(sql) return psql(sq, sql, "sq_app", app_pw) end

  it("delivers a plain INSERT, as in the original design, to a Lua handler", function()
    local id = assert(as_app(([[insert into msgbus.messages (receiver, type, data)
      values ('%s', 'charge', '{"usd":100,"user":123,"big":9007199254740993}') returning id]]):format(lx.service)))
    assert.matches("^%x+%-", id)
    local got
    env.wait_until(function()
      return env.scalar(lx, "select count(*)::int8 from msgbus.inbox") == 1
    end, 20, "the arrival")
    -- the seed's latency query, with the columns that exist
    assert.is_string(env.scalar(lx, [[select msgbus.latency(m)::text from msgbus.messages m
                                     where receiver = msgbus.service()]]))
    assert.equal(1, bus:listen(function(m) got = m end, { max = 1, timeout = 20 }))
    assert.equal(id, got.id)
    assert.equal(sq.service, got.sender)
    assert.equal(123, got.data.user)
    assert.equal(9007199254740993, got.data.big)
    assert.equal("integer", math.type(got.data.big))
    -- the SQL side sees the ack
    env.wait_until(function() return as_app(("select msgbus.acked('%s')"):format(id)) == "t" end, 20, "the ack")
  end)

  it("refuses bad rows at the sender with a clear SQL error", function()
    local out, err = as_app("insert into msgbus.messages (receiver, type) values ('nobody', 't')")
    assert.is_nil(out)
    assert.matches("unknown receiver \"nobody\"", err)
    out, err = as_app(("insert into msgbus.messages (receiver, type, data) values ('%s', 't', '[1]')"):format(lx.service))
    assert.is_nil(out)
    assert.matches("message data must be a JSON object, not array", err)
    out, err = as_app(("select msgbus.send('%s', 't', '{\"a\":%s1%s}')"):format(lx.service, ("["):rep(1000), ("]"):rep(1000)))
    assert.is_nil(out)
    assert.matches("message data is nested deeper than 1000 levels", err, 1, true)
    out, err = as_app(("select msgbus.send('%s', 'bad type!', '{}')"):format(lx.service))
    assert.is_nil(out)
    assert.matches("invalid message type 'bad type!'", err, 1, true)
    -- the check lets the apply worker's rows pass (session_replication_role = replica,
    -- which the inbox trigger has validated); the application cannot take that role
    out, err = as_app(("set session_replication_role = replica; insert into msgbus.messages (receiver, type, data)"
      .. " values ('%s', 't', '[1]')"):format(lx.service))
    assert.is_nil(out)
    assert.matches("permission denied to set parameter \"session_replication_role\"", err, 1, true)
    assert.equal("0", psql(sq, "select count(*) from msgbus.messages"))
  end)

  it("consumes with claim/done, rolls back a failing consumer, and replies", function()
    local id = assert(bus:send(sq.service, "quote", { item = "book" }, { await_reply = true }))
    assert.is_true(bus:wait_ack(id, 20))
    assert(psql(sq, "create table if not exists quotes (msg uuid primary key, item text); grant insert on quotes to sq_app"))
    -- a consumer that fails: its insert and its claim roll back, the message stays
    local out, err = as_app([[
      begin;
      insert into quotes select id, data->>'item' from msgbus.claim();
      select 1/0;
      commit;]])
    assert.is_nil(out)
    assert.matches("division by zero", err)
    assert.equal("0", psql(sq, "select count(*) from quotes"))
    assert.equal("1", as_app("select count(*) from msgbus.inbox"))
    -- a consumer that succeeds: claim, work, reply, done, in one transaction
    assert(as_app([[
      begin;
      create temp table m on commit drop as select * from msgbus.claim();
      insert into quotes select id, data->>'item' from m;
      select msgbus.reply(id, 'quoted', jsonb_build_object('price', 12.5, 'item', data->>'item')) from m;
      select msgbus.done(id) from m;
      commit;]]))
    assert.equal("1", psql(sq, "select count(*) from quotes"))
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))
    local r = assert(bus:wait_reply(id, 20))
    assert.equal("quoted", r.type)
    assert.equal(12.5, r.data.price)
    assert.equal("book", r.data.item)
    assert.equal(id, r.reply)
  end)

  it("records failed attempts and dead-letters after max_attempts", function()
    local id = assert(bus:send(sq.service, "poison", {}))
    assert.is_true(bus:wait_ack(id, 20))
    assert.equal("f", as_app(("select msgbus.fail('%s', 'boom 1', 2)"):format(id)))
    assert.equal("1|boom 1", as_app("select attempts, last_error from msgbus.inbox"))
    assert.equal("t", as_app(("select msgbus.fail('%s', 'boom 2', 2)"):format(id)))
    assert.equal("failed|boom 2|2", as_app("select reason, last_error, attempts from msgbus.dead_letters"))
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))
  end)

  it("claims a batch in each sender's order with claim_batch, and done_many consumes it", function()
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))
    local ids = {}
    assert(bus:transaction(function()
      for i = 1, 3 do ids[i] = assert(bus:send(sq.service, "batched", { i = i })) end
    end))
    assert.is_true(bus:wait_ack(ids[3], 20))
    -- the application role may call both; a claim without done_many consumes nothing
    assert.equal("1", as_app("select count(*) from msgbus.claim_batch(1)"))
    assert.equal("0", as_app("select msgbus.done_many('{}')"))
    assert.equal("3", as_app("select count(*) from msgbus.inbox"))
    local c1 = assert(core.connect(sq.conninfo))
    local c2 = assert(core.connect(sq.conninfo))
    local rows = assert(c1:script("begin; select id::text as id, (data->>'i')::int as i from msgbus.claim_batch(2)"))
    assert.same({ { id = ids[1], i = 1 }, { id = ids[2], i = 2 } }, rows)
    -- another consumer gets nothing: 3 is behind its sender's 1 and 2, locked by c1
    assert.same({}, assert(c2:script("begin; select id from msgbus.claim_batch(10)")))
    assert(c2:exec("rollback"))
    assert.same({ { n = 2 } }, assert(c1:exec("select msgbus.done_many($1::uuid[]) as n",
      ("{%s,%s}"):format(ids[1], ids[2]))))
    assert(c1:exec("commit"))
    rows = assert(c2:script("begin; select id::text as id from msgbus.claim_batch(10)"))
    assert.same({ { id = ids[3] } }, rows)
    assert(c2:script(("select msgbus.done_many('{%s}'); commit"):format(ids[3])))
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))
    local ok, err, code = c2:exec("select * from msgbus.claim_batch(0)")
    assert.is_nil(ok)
    assert.equal("22023", code)
    assert.matches("claim_batch takes from 1 to 1000 messages, not 0", err, 1, true)
    c1:close()
    c2:close()
  end)

  it("forgets a wait whose session is gone, so that its reply is handed out, and keeps live ones", function()
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))
    -- the application's session sends and registers that it waits for the reply,
    -- as bus:send(..., { await_reply = true }) does
    local holder = assert(core.connect(sq.conninfo:gsub("user=%S+", "") .. " user=sq_app password=" .. app_pw))
    local id = assert(holder:exec(("with m as (select msgbus.send('%s', 'ask', '{}') as id), "
      .. "w as (insert into msgbus.waits (id) select id from m) select id::text from m"):format(lx.service)))[1].id
    assert.equal(1, bus:listen(function(m) assert(bus:reply(m, "answer", { n = 1 })) end, { max = 1, timeout = 20 }))
    env.wait_until(function()
      return as_app(("select count(*) from msgbus.inbox where reply = '%s'"):format(id)) == "1"
    end, 20, "the reply")
    local function claimable()
      return as_app("select coalesce(string_agg(reply::text, ','), '-') from msgbus.claim()")
    end
    -- held by a live session: not handed out, and not forgotten even with no grace
    assert.equal("-", claimable())
    assert.equal("0", as_app("select msgbus.forget_orphaned_waits('0')"))
    assert.equal("0", as_app("select msgbus.forget_orphaned_waits()"))
    assert.equal("-", claimable())
    -- a live session's wait marked orphaned (its pid came back) is unmarked
    assert(psql(sq, "update msgbus.waits set orphaned_at = now() - interval '1 day'"))
    assert.equal("0", as_app("select msgbus.forget_orphaned_waits('1 minute')"))
    assert.equal("0", psql(sq, "select count(*) from msgbus.waits where orphaned_at is not null"))

    -- the holder's session dies: with a grace, the first call only notes it
    local watcher = assert(core.connect(sq.conninfo))
    assert(watcher:exec("listen " .. watcher:escape_identifier("msgbus_" .. sq.service)))
    assert.equal("t", psql(sq, ("select pg_terminate_backend(%d, 10000)"):format(holder:backend_pid())))
    holder:close()
    assert.equal("0", as_app("select msgbus.forget_orphaned_waits('1 hour')"))
    assert.equal("1", psql(sq, "select count(*) from msgbus.waits where orphaned_at is not null"))
    assert.equal("-", claimable())
    -- the application role forgets it (grace 0: in one call), which wakes listeners
    assert.same({}, assert(watcher:wait(0)))
    assert.equal("1", as_app("select msgbus.forget_orphaned_waits('0')"))
    assert.equal("0", psql(sq, "select count(*) from msgbus.waits"))
    local notes = env.wait_until(function()
      local n = assert(watcher:wait(0.2))
      return n[1] and n
    end, 20, "the inbox notification")
    assert.equal("msgbus_" .. sq.service, notes[1].channel)
    watcher:close()
    -- and the reply is handed out like any message
    assert.equal(id, claimable())
    assert(as_app(("select msgbus.done(id) from msgbus.inbox where reply = '%s'"):format(id)))
    assert.equal("0", as_app("select count(*) from msgbus.inbox"))

    -- waits from before migration 009 have no holder: forgotten after dedup_retention
    assert(psql(sq, [[insert into msgbus.waits (id, pid, since) values
      (gen_random_uuid(), null, now() - interval '8 days'), (gen_random_uuid(), null, now())]]))
    assert.equal("1", as_app("select msgbus.forget_orphaned_waits('0')"))
    assert.equal("1", psql(sq, "select count(*) from msgbus.waits where pid is null"))
    assert(psql(sq, "delete from msgbus.waits"))
    -- prune forgets those gone longer than its grace (1 minute), and counts them
    assert(psql(sq, [[insert into msgbus.waits (id, pid, orphaned_at) values
      (gen_random_uuid(), 0, now() - interval '2 minutes'), (gen_random_uuid(), 0, now())]]))
    assert.equal("1", psql(sq, "select msgbus.prune()"))
    assert.equal("1", psql(sq, "select count(*) from msgbus.waits"))
    assert(psql(sq, "delete from msgbus.waits"))
    -- the application role can also take a wait back itself (wait_reply's timeout)
    local w = assert(as_app("insert into msgbus.waits (id) values (gen_random_uuid()) returning id"))
    assert.equal("1", as_app(("with d as (delete from msgbus.waits where id = '%s' returning 1) select count(*) from d")
      :format(w)))
    local out, err = as_app("select msgbus.forget_orphaned_waits('-1 second')")
    assert.is_nil(out)
    assert.matches("needs a grace of zero or more", err, 1, true)
  end)

  it("gives the application role no more than the protocol", function()
    for _, sql in ipairs {
      "delete from msgbus.dead_letters",
      "update msgbus.messages set type = 'x'",
      "drop trigger arrival on msgbus.to_" .. sq.service,
      "create or replace function msgbus.service() returns text language sql as $$ select 'x' $$",
      ("select msgbus.add_peer('x')"),
      ("select msgbus.resend('%s')"):format(lx.service),
      "select * from msgbus.seen",
      "update msgbus.waits set since = now()",
      -- the trigger functions and the trigger itself cannot be changed or bypassed
      "create or replace function msgbus.on_arrival() returns trigger language plpgsql as $$ begin return new; end $$",
      "alter function msgbus.on_arrival() set search_path = public",
      "alter function msgbus.on_arrival() owner to current_user",
      "alter table msgbus.to_" .. sq.service .. " disable trigger arrival",
      -- nothing can be planted in the schema for an unpinned lookup to find
      "create table msgbus.peers2 (x int)",
      "create function msgbus.now() returns int language sql as $$ select 1 $$",
      ("select msgbus.hold('%s')"):format(lx.service),
      ("select msgbus.write_passfile('/tmp/msgbus_a_to_b.pgpass', '')"),
    } do
      local out, err = as_app(sql)
      assert.is_nil(out, sql)
      assert.is_truthy(err:find("permission denied", 1, true) or err:find("must be owner", 1, true), err)
    end
  end)

  it("pins search_path in every msgbus function, and the installing role owns the schema", function()
    local svc = { conninfo = sq.conninfo }
    assert.is_true(env.scalar(svc, "select count(*) from pg_proc where pronamespace = 'msgbus'::regnamespace") > 20)
    assert.same({}, env.exec(svc, [[select proname from pg_proc
      where pronamespace = 'msgbus'::regnamespace
        and not coalesce('search_path=pg_catalog, pg_temp' = any (proconfig), false)]]))
    assert.equal("postgres", env.scalar(svc, "select nspowner::regrole::text from pg_namespace where nspname = 'msgbus'"))
    assert.same({}, env.exec(svc, [[select c.relname from pg_class c
      where c.relnamespace = 'msgbus'::regnamespace and c.relowner <> 'postgres'::regrole]]))
    -- and nothing in the schema is executable by PUBLIC but the check constraint's
    -- function (every sending role runs it), which reads and writes nothing
    assert.same({ { proname = "valid_message", provolatile = "i" } }, env.exec(svc, [[select proname, provolatile from pg_proc
      where pronamespace = 'msgbus'::regnamespace and has_function_privilege('public', oid, 'execute')]]))
  end)

  it("notifies on the documented channels", function()
    local c = assert(core.connect(sq.conninfo))
    assert(c:exec("listen msgbus_" .. sq.service))
    local id = assert(bus:send(sq.service, "note", {}))
    local got = env.wait_until(function()
      local n = assert(c:wait(0.2))
      return n[1]
    end, 20, "a notification")
    assert.equal("msgbus_" .. sq.service, got.channel)
    assert.is_true(bus:wait_ack(id, 20))
    c:close()
  end)
end)
