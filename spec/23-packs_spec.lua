-- Packs (migrations 014 and 015): send_many to a peer at version 14 travels as rows
-- of up to 1,000 messages. The receiver keeps a whole pack as one inbox row, which a
-- batch hands out as its messages (a smaller batch first splits it into packs of its
-- size), and unpacks it into the inbox rows they would have been had they travelled
-- alone when one message at a time is taken.
local msgbus = require "msgbus"
local core = require "msgbus.core"
local env = require "helpers.env"

local NIL_UUID = "00000000-0000-0000-0000-000000000000"

-- Count the rows that arrive at `svc`'s inbox by type (env.inbox_spy, which also
-- sees the messages a pack is unpacked into). Returns a function that gives the
-- counts, and one that removes the trigger.
local function spy_types(svc)
  local stop = env.inbox_spy(svc, "type_spy", "type text", "insert into public.type_spy values (new.type);")
  return function()
    local counts = {}
    for _, r in ipairs(env.exec(svc, "select type, count(*)::int8 as n from public.type_spy group by type")) do
      counts[r.type] = r.n
    end
    return counts
  end, stop
end

local function subscription(of, from)
  return ("msgbus_%s_to_%s"):format(from.service, of.service)
end

-- Everything in `svc`'s inbox, in arrival order, as a handler would get it (batch:
-- listen's, 50 unless given; false: one message a transaction).
local function drain(bus, n, batch)
  local got = {}
  if batch == nil then batch = 50 end
  assert.equal(n, bus:listen(function(m) got[#got + 1] = m end, { max = n, timeout = 30, batch = batch or nil }))
  return got
end

-- The rows of `svc`'s inbox by type, and the messages they hold.
local function inbox_rows(svc)
  local rows = {}
  for _, r in ipairs(env.exec(svc, [[select type, count(*)::int8 as n, sum(msgbus.message_count(type, data))::int8 as m
                                       from msgbus.inbox group by type]])) do
    rows[r.type] = { r.n, r.m }
  end
  return rows
end

describe("packs", function()
  local store, payments, sbus, pbus

  setup(function()
    store, payments = env.linked({ "pkst", "pkpy" }, { "a", "b" })
    sbus = env.connect(store)
    pbus = env.connect(payments)
    env.wait_until(function()
      return env.scalar(store, "select packs from msgbus.peers where service = $1", payments.service)
         and env.scalar(payments, "select packs from msgbus.peers where service = $1", store.service)
    end, 30, "the link's hellos")
  end)

  teardown(function()
    sbus:close()
    pbus:close()
  end)

  it("carry send_many's messages, which arrive one by one, in order, with the data sent", function()
    local spy, unspy = spy_types(payments)
    local list = {}
    for i = 1, 2500 do
      list[i] = { i = i, big = "9007199254740993", n = 12345678901234567, text = "é\t\"" .. i,
                  nested = { a = { i, i * 2 }, e = msgbus.null } }
    end
    local ids = assert(sbus:send_many(payments.service, "many", list, { ttl = 3600 }))
    assert.equal(2500, #ids)
    for _, id in ipairs(ids) do assert.is_true(sbus:wait_ack(id, 30)) end
    assert.equal(0, env.outbox_count(store, payments))
    -- three rows travelled, packs of 1,000, 1,000 and 500 messages, and wait in the
    -- inbox as they came
    assert.same({ ["msgbus.pack"] = { 3, 2500 } }, inbox_rows(payments))
    local got = drain(pbus, 2500, 1000)
    unspy()
    -- a batch took each pack whole: no message became a row of its own
    assert.same({ ["msgbus.pack"] = 3 }, spy())
    for i, m in ipairs(got) do
      assert.equal(ids[i], m.id)
      assert.equal("many", m.type)
      assert.equal(store.service, m.sender)
      assert.same(list[i], m.data)
      assert.equal(0, m.attempts)
      assert.is_string(m.expires_at)
    end
    assert.same({}, inbox_rows(payments))
  end)

  it("end a pack before it passes a megabyte of data", function()
    local spy, unspy = spy_types(payments)
    local list = {}
    for i = 1, 6 do list[i] = { i = i, blob = ("x"):rep(400 * 1024) } end
    local ids = assert(sbus:send_many(payments.service, "big", list))
    assert.is_true(sbus:wait_ack(ids[6], 30))
    local got = drain(pbus, 6)
    unspy()
    -- 400 KB each: the first megabyte ends after two, the second after five
    assert.same({ ["msgbus.pack"] = 3 }, spy())
    for i, m in ipairs(got) do
      assert.equal(ids[i], m.id)
      assert.same(list[i], m.data)
    end
  end)

  it("keep a message of a pack unacknowledged, and counted, until its pack is acknowledged", function()
    local sub = subscription(payments, store)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local list = {}
    for i = 1, 1200 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "held", list, { delay = 0 }))
    assert.equal(2, env.scalar(store, "select count(*)::int8 from msgbus.messages where receiver = $1", payments.service))
    assert.equal(1200, env.outbox_count(store, payments))
    local st = assert(sbus:status())
    local depth
    for _, p in ipairs(st.peers) do if p.peer == payments.service then depth = p.outbox.depth end end
    assert.equal(1200, depth)
    local ok, _, code = sbus:wait_ack(ids[1], 0)
    assert.is_nil(ok)
    assert.equal("timeout", code)
    assert.is_false(env.scalar(store, "select msgbus.acked($1)", ids[1200]))
    -- unlinking would discard them: refused, with the count of messages
    local uok, uerr = msgbus.setup.unlink(store, payments)
    assert.is_nil(uok)
    assert.matches("1200", uerr)
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(ids[1], 30))
    assert.is_true(sbus:wait_ack(ids[1200], 30))
    assert.equal(1200, #drain(pbus, 1200))
  end)

  it("count a message of a pack as acknowledged once its pack's ack came early", function()
    local sub = subscription(payments, store)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local ids = assert(sbus:send_many(payments.service, "early", { { i = 1 }, { i = 2 } }))
    local pack = env.scalar(store, "select id::text from msgbus.messages where receiver = $1 and type = 'msgbus.pack'",
                            payments.service)
    assert.is_false(env.scalar(store, "select msgbus.acked($1)", ids[2]))
    -- as when the pack's ack arrives before the pack is visible here (msgbus.early_acks)
    env.exec(store, "insert into msgbus.early_acks (id, receiver) values ($1, $2)", pack, payments.service)
    assert.is_true(env.scalar(store, "select msgbus.acked($1)", ids[2]))
    assert.is_true(sbus:wait_ack(ids[1], 0))
    assert.equal(0, assert(sbus:status()).peers[1].outbox.depth)
    env.exec(store, "delete from msgbus.early_acks where id = $1", pack)
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(ids[2], 30))
    assert.equal(2, #drain(pbus, 2))
  end)

  it("take a reply to a message that came in a pack", function()
    local ids = assert(sbus:send_many(payments.service, "ask", { { q = 1 }, { q = 2 } }))
    local got = drain(pbus, 2)
    local rid = assert(pbus:reply(got[2], "answer", { a = got[2].data.q }))
    local r = assert(sbus:wait_reply(ids[2], 30))
    assert.equal(rid, r.id)
    assert.equal(ids[2], r.reply)
    assert.same({ a = 2 }, r.data)
  end)

  it("hand out each message of a pack sent twice (repair's resend) once", function()
    local sub = subscription(payments, store)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local list = {}
    for i = 1, 300 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "twice", list))
    -- the pack goes through the slot a second time: both copies arrive
    assert.equal(300, env.scalar(store, "select msgbus.resend($1)", payments.service))
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(ids[300], 30))
    local got = drain(pbus, 300)
    for i, m in ipairs(got) do assert.equal(ids[i], m.id) end
    -- nothing more: the second copy was dropped (its ack came back too)
    assert.equal(0, pbus:listen(function() end, { max = 1, timeout = 0 }))
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from msgbus.early_acks") == 0
          or env.outbox_count(store, payments) == 0
    end, 10, "the second ack")
    assert.equal(0, env.outbox_count(store, payments))
  end)

  it("dead-letter a message of a pack that fails validation alone, with its reason", function()
    local rows = env.exec(payments, "select gen_random_uuid()::text as id from generate_series(1, 4)")
    local good1, good2, flat, deep = rows[1].id, rows[2].id, rows[3].id, rows[4].id
    local deep_json = ("["):rep(1001) .. ("]"):rep(1001)
    local pack = ([[{"type": "mixed", "ids": ["%s", "%s", "not-a-uuid", "%s", "%s", "%s"],
                     "data": [{"a": 1}, [1], {"lost": true}, {"d": %s}, {"b": 2}, {"again": true}]}]])
      :format(good1, flat, deep, good2, good1, deep_json)
    assert(env.arrive(payments, store, "msgbus.pack", nil, pack))
    local got = drain(pbus, 2)
    assert.same({ good1, good2 }, { got[1].id, got[2].id })
    assert.same({ a = 1 }, got[1].data)
    assert.same({ b = 2 }, got[2].data)
    assert.same({ { id = flat, reason = "data is not a JSON object", type = "mixed" },
                  { id = deep, reason = "data nested deeper than 1000 levels", type = "mixed" } },
      env.exec(payments, "select id::text, reason, type from msgbus.dead_letters where id in ($1, $2) order by reason",
               flat, deep))
    -- a row of type msgbus.pack that is not one is dead-lettered whole; redeliver
    -- refuses it
    local bad = env.scalar(payments, "select gen_random_uuid()::text")
    assert(env.arrive(payments, store, "msgbus.pack", nil, '{"type": "x", "ids": [], "data": [{}]}', bad))
    assert.equal("not a pack of messages",
      env.scalar(payments, "select reason from msgbus.dead_letters where id = $1", bad))
    local ok, err = pcall(env.exec, payments, "select msgbus.redeliver($1)", bad)
    assert.is_false(ok)
    assert.matches("malformed pack", tostring(err))
    assert.equal(1, env.scalar(payments, "select count(*)::int8 from msgbus.dead_letters where id = $1", bad))
    assert.equal(0, env.scalar(payments, "select count(*)::int8 from msgbus.inbox"))
  end)

  it("keep their place for a listener that takes one message at a time, or fewer than a pack", function()
    -- a plain message, two packs (1,000 and 200), a plain message: the sender's order
    -- must hold whichever way they are taken
    local function send_all()
      local want = {}
      assert(sbus:transaction(function()
        want[1] = assert(sbus:send(payments.service, "mixed", { i = 0 }))
        local list = {}
        for i = 1, 1200 do list[i] = { i = i } end
        for i, id in ipairs(assert(sbus:send_many(payments.service, "mixed", list))) do want[i + 1] = id end
        want[1202] = assert(sbus:send(payments.service, "mixed", { i = 1201 }))
      end))
      assert.is_true(sbus:wait_ack(want[1202], 30))
      assert.same({ mixed = { 2, 2 }, ["msgbus.pack"] = { 2, 1200 } }, inbox_rows(payments))
      return want
    end
    for _, batch in ipairs { false, 7, 1000 } do
      local want = send_all()
      local got = drain(pbus, 1202, batch)
      for i, m in ipairs(got) do
        assert.equal(want[i], m.id, ("batch %s, message %d"):format(tostring(batch), i))
        assert.equal(i - 1, m.data.i)
      end
      assert.same({}, inbox_rows(payments))
    end
  end)

  it("split for a batch smaller than the pack into packs of its size, in its place", function()
    local list = {}
    for i = 1, 20 do list[i] = { i = i } end
    local ids
    assert(sbus:transaction(function()
      ids = assert(sbus:send_many(payments.service, "split", list))
      ids[21] = assert(sbus:send(payments.service, "split", { i = 21 }))
    end))
    assert.is_true(sbus:wait_ack(ids[21], 30))
    local got = {}
    local function take(m) got[#got + 1] = m end
    assert.equal(7, pbus:listen(take, { batch = 7, max = 7, timeout = 5 }))
    -- the first of three packs (7, 7 and 6) went as the batch; the other two wait
    -- as packs before the message sent after them
    assert.same({ { type = "msgbus.pack", n = 7 }, { type = "msgbus.pack", n = 6 }, { type = "split", n = 1 } },
      env.exec(payments, "select type, msgbus.message_count(type, data)::int8 as n from msgbus.inbox order by pos"))
    -- a listener with a smaller batch splits those again (5 and 2, 5 and 1)
    assert.equal(14, pbus:listen(take, { batch = 5, max = 14, timeout = 5 }))
    assert.equal(21, #got)
    for i, m in ipairs(got) do
      assert.equal(ids[i], m.id)
      assert.same({ i = i }, m.data)
    end
    assert.same({}, inbox_rows(payments))
  end)

  it("keep a pack's id in msgbus.seen while any part of it waits, so that a copy is dropped", function()
    local retention = env.scalar(payments, "select dedup_retention::text from msgbus.config")
    env.exec(payments, "update msgbus.config set dedup_retention = '0 seconds'")
    finally(function() env.exec(payments, "update msgbus.config set dedup_retention = $1::interval", retention) end)
    local sub = subscription(payments, store)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local list = {}
    for i = 1, 20 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "kept", list))
    local pack = env.exec(store, "select id::text, data::text from msgbus.messages where receiver = $1 and type = 'msgbus.pack'",
                          payments.service)[1]
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(ids[20], 30))
    local function seen() return env.scalar(payments, "select count(*)::int8 from msgbus.seen where id = $1", pack.id) end
    -- a batch of 7 splits the pack and takes the first part; two parts wait
    assert.equal(7, pbus:listen(function() end, { batch = 7, max = 7, timeout = 5 }))
    env.exec(payments, "select msgbus.prune()")
    assert.equal(1, seen())
    -- a copy of the pack, as a repair's resend brings it, is dropped
    assert(env.arrive(payments, store, "msgbus.pack", nil, pack.data, pack.id))
    assert.same({ ["msgbus.pack"] = { 2, 13 } }, inbox_rows(payments))
    -- all of it handled: forgotten
    local got = {}
    assert.equal(13, pbus:listen(function(m) got[#got + 1] = m.data.i end, { batch = 7, max = 13, timeout = 5 }))
    assert.same({ 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 }, got)
    env.exec(payments, "select msgbus.prune()")
    assert.equal(0, seen())
  end)

  it("record a failed message of a pack and go on after it, each handled once", function()
    pbus:exec("create table if not exists pack_effects (msg uuid primary key, i int)")
    local list = {}
    for i = 1, 10 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "flaky", list))
    assert.is_true(sbus:wait_ack(ids[10], 30))
    local calls, order, attempts = {}, {}, {}
    assert.equal(10, pbus:listen(function(m)
      calls[m.data.i] = (calls[m.data.i] or 0) + 1
      order[#order + 1] = m.data.i
      attempts[#attempts + 1] = m.attempts
      assert(pbus:exec("insert into pack_effects values ($1, $2)", m.id, m.data.i))
      if m.data.i == 4 and calls[4] == 1 then error("first attempt of 4 fails") end
    end, { batch = 1000, max = 10, timeout = 10 }))
    -- 1 to 3 committed with the attempt of 4; 4 came again, counted, before the rest
    assert.same({ 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10 }, order)
    assert.same({ 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 }, attempts)
    assert.equal(10, env.scalar(payments, "select count(*)::int8 from pack_effects"))
    assert.equal(0, env.scalar(payments, "select count(*)::int8 from pack_effects where msg <> all ($1::uuid[])",
                               "{" .. table.concat(ids, ",") .. "}"))
    assert.same({}, inbox_rows(payments))
  end)

  it("put at most 64 handlers that use the database in a batch, a pack's too", function()
    local list = {}
    for i = 1, 150 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "wide", list))
    assert.is_true(sbus:wait_ack(ids[150], 30))
    local sizes, got = env.listen_tx_sizes(pbus, { batch = 1000, max = 150, timeout = 5 })
    assert.same({ 22, 64, 64 }, sizes)
    assert.equal(150, #got)
    for i = 1, 150 do assert.equal(i, got[i]) end
    assert.same({}, inbox_rows(payments))
  end)

  it("dead-letter a stored pack's messages one by one when it expires", function()
    local list = {}
    for i = 1, 3 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "stale", list, { ttl = 0.5 }))
    assert.is_true(sbus:wait_ack(ids[3], 30))
    assert.same({ ["msgbus.pack"] = { 1, 3 } }, inbox_rows(payments))
    env.wait_until(function()
      return env.scalar(payments, "select count(*)::int8 from msgbus.inbox where expires_at < now()") == 1
    end, 30, "the ttl to pass")
    assert.equal(0, pbus:listen(function() error("an expired message was handed out") end,
                                { batch = 1000, max = 1, timeout = 0 }))
    local dead = env.exec(payments, [[select id::text, type, data::text, reason, sender from msgbus.dead_letters
                                       where id = any ($1::uuid[]) order by id]], "{" .. table.concat(ids, ",") .. "}")
    assert.equal(3, #dead)
    for _, d in ipairs(dead) do
      local i
      for k, id in ipairs(ids) do if id == d.id then i = k end end
      assert.same({ id = ids[i], type = "stale", data = ('{"i": %d}'):format(i), reason = "expired",
                    sender = store.service }, d)
    end
    assert.same({}, inbox_rows(payments))
  end)

  it("unpack a pack on arrival when its first message was seen before (sent again after version 14 unpacked it)", function()
    local sub = subscription(payments, store)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local ids = assert(sbus:send_many(payments.service, "again", { { i = 1 }, { i = 2 }, { i = 3 } }))
    -- as version 14 leaves it: the ids it unpacked are in msgbus.seen
    env.exec(payments, "insert into msgbus.seen (id, sender) values ($1, $2)", ids[1], store.service)
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(ids[3], 30))
    -- unpacked on arrival, the message seen before dropped
    assert.same({ again = { 2, 2 } }, inbox_rows(payments))
    local got = drain(pbus, 2)
    assert.same({ ids[2], ids[3] }, { got[1].id, got[2].id })
  end)

  it("let SQL callers of claim_batch finish a pack's messages with done, fail and reply", function()
    local ids = assert(sbus:send_many(payments.service, "bysql", { { i = 1 }, { i = 2 }, { i = 3 } }))
    assert.is_true(sbus:wait_ack(ids[3], 30))
    local c = assert(core.connect(payments.conninfo))
    assert(c:exec("begin"))
    local rows = assert(c:exec("select id::text as id from msgbus.claim_batch(10)"))
    assert.same(ids, { rows[1].id, rows[2].id, rows[3].id })
    -- a reply to the second, the first failed, the second done; the third left
    assert(c:exec("select msgbus.reply($1, 'answer', '{\"a\": 2}')", ids[2]))
    assert.is_false(assert(c:exec("select msgbus.fail($1, 'no', 5) as dead", ids[1]))[1].dead)
    assert.is_true(assert(c:exec("select msgbus.done($1) as done", ids[2]))[1].done)
    assert.is_false(assert(c:exec("select msgbus.done($1) as done", ids[2]))[1].done)
    assert(c:exec("commit"))
    c:close()
    local left = env.exec(payments, "select id::text, attempts, last_error from msgbus.inbox order by pos")
    assert.same({ { id = ids[1], attempts = 1, last_error = "no" }, { id = ids[3], attempts = 0 } }, left)
    local r = assert(sbus:wait_reply(ids[2], 30))
    assert.same({ a = 2 }, r.data)
    local got = drain(pbus, 2, 1000)
    assert.same({ ids[1], ids[3] }, { got[1].id, got[2].id })
  end)

  it("refuse a pack made by hand that is not one, at the sender, and insert nothing", function()
    local id = env.scalar(store, "select gen_random_uuid()::text")
    local cases = {
      { '{"type": "x", "ids": ["' .. id .. '"], "data": []}', "same length" },
      { '{"type": "msgbus.x", "ids": ["' .. id .. '"], "data": [{}]}', "invalid message type" },
      { '{"type": "x", "ids": ["' .. id .. '", "' .. id .. '"], "data": [{}, {}]}', "distinct UUIDs" },
      { '{"type": "x", "ids": ["' .. id:upper() .. '"], "data": [{}]}', "distinct UUIDs" },
      { '{"type": "x", "ids": ["' .. id .. '"], "data": [1]}', "JSON object" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(env.exec, store, "insert into msgbus.messages (receiver, type, data) values ($1, 'msgbus.pack', $2)",
                            payments.service, case[1])
      assert.is_false(ok, case[1])
      assert.matches(case[2], tostring(err), 1, true)
    end
    assert.equal(0, env.outbox_count(store, payments))
  end)

  it("send one row a message to a peer that has not said it unpacks packs", function()
    env.exec(store, "update msgbus.peers set packs = false where service = $1", payments.service)
    local spy, unspy = spy_types(payments)
    local list = {}
    for i = 1, 20 do list[i] = { i = i } end
    local ids = assert(sbus:send_many(payments.service, "rows", list))
    assert.is_true(sbus:wait_ack(ids[20], 30))
    local got = drain(pbus, 20)
    unspy()
    env.exec(store, "update msgbus.peers set packs = true where service = $1", payments.service)
    assert.same({ rows = 20 }, spy())
    for i, m in ipairs(got) do assert.equal(ids[i], m.id) end
  end)

  it("tell a peer with the hello of version 14, and answer one", function()
    env.exec(payments, "update msgbus.peers set packs = false where service = $1", store.service)
    env.exec(store, "update msgbus.peers set packs = false where service = $1", payments.service)
    env.exec(store, "select msgbus.hello($1)", payments.service)
    env.wait_until(function()
      return env.scalar(store, "select packs from msgbus.peers where service = $1", payments.service)
         and env.scalar(payments, "select packs from msgbus.peers where service = $1", store.service)
    end, 30, "the hello and its answer")
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.early_acks where id = $1", NIL_UUID))
  end)
end)
