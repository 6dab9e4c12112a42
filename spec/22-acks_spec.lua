-- Acks: one row for many messages (migration 012), the hello that switches it on, and
-- peers on the version before it.
local msgbus = require "msgbus"
local core = require "msgbus.core"
local env = require "helpers.env"

local NIL_UUID = "00000000-0000-0000-0000-000000000000"

local outbox_count = env.outbox_count

local function batched(svc, peer)
  return env.scalar(svc, "select batched_acks from msgbus.peers where service = $1", peer.service)
end

local function set_batched(svc, peer, on)
  env.exec(svc, "update msgbus.peers set batched_acks = $2 where service = $1", peer.service, on)
end

-- Record the acks that arrive at `svc` (env.inbox_spy). Returns a function that gives
-- the rows so far by kind (hello, msgbus.ack, msgbus.acks), with how many messages
-- they name, one that gives the sizes of the msgbus.acks rows, and one that removes
-- the trigger.
local function spy_acks(svc)
  local stop = env.inbox_spy(svc, "ack_spy", "kind text, n int", ([[
      if new.type = 'msgbus.ack' and new.reply = '%s' then
        insert into public.ack_spy values ('hello', 1);
      elsif new.type = 'msgbus.ack' then
        insert into public.ack_spy values (new.type, 1);
      elsif new.type = 'msgbus.acks' then
        insert into public.ack_spy values (new.type, jsonb_array_length(new.data -> 'ids'));
      end if;]]):format(NIL_UUID))
  local function seen()
    return env.exec(svc, [[select kind, count(*)::int8 as rows, sum(n)::int8 as messages
                             from public.ack_spy group by kind order by kind]])
  end
  local function sizes()
    local out = {}
    for _, r in ipairs(env.exec(svc, "select n from public.ack_spy where kind = 'msgbus.acks' order by n desc")) do
      out[#out + 1] = r.n
    end
    return out
  end
  return seen, sizes, stop
end

-- Send n messages to `to` in one transaction, one row each (send, not send_many,
-- which packs them for a peer at version 14: see spec 23); returns their ids.
local function send_batch(bus, to, n, mtype)
  local ids = {}
  assert(bus:transaction(function()
    for i = 1, n do ids[i] = assert(bus:send(to.service, mtype or "many", { i = i })) end
  end))
  return ids
end

local function wait_acks(bus, ids)
  for _, id in ipairs(ids) do
    assert.is_true(bus:wait_ack(id, 30), "ack of " .. id)
  end
end

describe("acks", function()
  local store, payments, sbus, pbus

  setup(function()
    store, payments = env.linked({ "ackst", "ackpy" }, { "a", "b" })
    sbus = env.connect(store)
    pbus = env.connect(payments)
    -- the link's hellos: each side knows that the other takes msgbus.acks
    env.wait_until(function() return batched(store, payments) and batched(payments, store) end, 30,
      "both sides to take msgbus.acks")
  end)

  teardown(function()
    sbus:close()
    pbus:close()
  end)

  it("acknowledge a transaction of many messages with one row for each 100 after the first", function()
    local seen, sizes, stop = spy_acks(store)
    local ids = send_batch(sbus, payments, 250)
    wait_acks(sbus, ids)
    stop()
    -- the first message's ack right away; 100, 100, and the last 49 at commit
    assert.same({ { kind = "msgbus.ack", rows = 1, messages = 1 },
                  { kind = "msgbus.acks", rows = 3, messages = 249 } }, seen())
    assert.same({ 100, 100, 49 }, sizes())
    assert.equal(0, outbox_count(store, payments))
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.early_acks"))
    -- and the messages are there to handle, once each
    local got = {}
    assert.equal(250, pbus:listen(function(m) got[#got + 1] = m.data.i end, { max = 250, timeout = 20, batch = 50 }))
    for i = 1, 250 do assert.equal(i, got[i]) end
    assert.equal(0, env.scalar(payments, "select count(*)::int8 from msgbus.ack_flush"))
  end)

  it("go one row a message to a peer that has not said it takes msgbus.acks", function()
    set_batched(payments, store, false)
    local seen, _, stop = spy_acks(store)
    local ids = send_batch(sbus, payments, 5)
    wait_acks(sbus, ids)
    stop()
    set_batched(payments, store, true)
    assert.same({ { kind = "msgbus.ack", rows = 5, messages = 5 } }, seen())
    assert.equal(5, pbus:listen(function() end, { max = 5, timeout = 20 }))
  end)

  it("are switched on by a hello, which a peer answers once", function()
    set_batched(store, payments, false)
    set_batched(payments, store, false)
    local seen, _, stop = spy_acks(store)
    env.exec(store, "select msgbus.hello($1)", payments.service)
    -- payments learns it from store's hello, store from payments' answer
    env.wait_until(function() return batched(payments, store) and batched(store, payments) end, 30, "the answer")
    -- a hello to a peer that knows already gets no answer: the ack of a message sent
    -- after it comes back after any answer would have (one subscription, in order)
    env.exec(store, "select msgbus.hello($1)", payments.service)
    local id = assert(sbus:send(payments.service, "after_hello", {}))
    assert.is_true(sbus:wait_ack(id, 30))
    stop()
    assert.same({ { kind = "hello", rows = 1, messages = 1 },
                  { kind = "msgbus.ack", rows = 1, messages = 1 } }, seen())
    assert.equal(1, pbus:listen(function() end, { max = 1, timeout = 20 }))
  end)

  it("take what a msgbus.acks row names, keep ids not visible yet as early acks, and ignore what is malformed",
    function()
    -- incoming rows replayed by hand as the apply worker runs them; store's messages
    -- stay in its outbox meanwhile
    local sub = ("msgbus_%s_to_%s"):format(store.service, payments.service)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local a = assert(sbus:send(payments.service, "held", { n = 1 }))
    local b = assert(sbus:send(payments.service, "held", { n = 2 }))
    local unseen = env.scalar(store, "select gen_random_uuid()::text")
    local function arrive(mtype, reply, data)
      assert(env.arrive(store, payments, mtype, reply, data))
    end
    for _, bad in ipairs {
      { "msgbus.acks", nil, '{}' },
      { "msgbus.acks", nil, '{"ids": "' .. a .. '"}' },
      { "msgbus.acks", nil, '{"ids": {"id": "' .. a .. '"}}' },
      { "msgbus.acks", nil, '{"ids": [1, null, {}, [], "not-a-uuid", "' .. a:upper() .. '", "' .. a .. 'x"]}' },
      { "msgbus.acks", nil, '{"ids": []}' },
      { "msgbus.ack", NIL_UUID, '{"msgbus": "12"}' },
      { "msgbus.ack", NIL_UUID, '{"msgbus": 11}' },
      { "msgbus.ack", NIL_UUID, '{}' },
    } do
      arrive(bad[1], bad[2], bad[3])
    end
    assert.equal(2, outbox_count(store, payments))
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.early_acks"))
    set_batched(store, payments, false)
    arrive("msgbus.ack", NIL_UUID, '{"msgbus": 11}')
    assert.is_false(batched(store, payments))
    -- a hello from version 12 (or later) switches them on
    arrive("msgbus.ack", NIL_UUID, '{"msgbus": 13}')
    assert.is_true(batched(store, payments))
    -- a good one: a is acknowledged, the id store cannot see is kept, b is not touched
    arrive("msgbus.acks", nil, ('{"ids": ["%s", "%s"]}'):format(a, unseen))
    assert.is_true(sbus:wait_ack(a, 0))
    assert.same({ { id = b } }, env.exec(store, "select id::text from msgbus.messages where receiver = $1", payments.service))
    assert.same({ { id = unseen } }, env.exec(store, "select id::text from msgbus.early_acks"))
    -- the message that id names becomes visible: it counts as acknowledged, and the
    -- next ack settles both
    env.exec(store, "insert into msgbus.messages (id, receiver, type, data) values ($1, $2, 'late', '{}')",
      unseen, payments.service)
    assert.is_true(sbus:wait_ack(unseen, 0))
    env.exec(payments, "alter subscription " .. sub .. " enable")
    -- b (and a and late, which the slot still holds) arrive, and b's ack comes back
    assert.is_true(sbus:wait_ack(b, 30))
    env.wait_until(function() return outbox_count(store, payments) == 0 end, 30, "the outbox to empty")
    assert.equal(3, pbus:listen(function() end, { max = 3, timeout = 20 }))
    -- the acks of a and late came after their rows had gone, so they wait as early acks
    -- until dedup_retention; not for the next tests
    env.exec(store, "delete from msgbus.early_acks")
  end)

  it("name the message of the first ack of each transaction on the ack channel", function()
    local c = assert(core.connect(store.conninfo))
    assert(c:exec(('listen "msgbus_%s_ack"'):format(store.service)))
    local one = assert(sbus:send(payments.service, "one", {}))
    wait_acks(sbus, { one })
    local ids = send_batch(sbus, payments, 150)
    wait_acks(sbus, ids)
    -- one transaction of acks for `one`; one for the batch: its first message's ack,
    -- then two msgbus.acks rows, whose notifications fold into one, unnamed
    local payloads = {}
    env.wait_until(function()
      for _, n in ipairs(assert(c:notifications())) do payloads[#payloads + 1] = n.payload end
      return #payloads >= 3
    end, 10, "three notifications")
    c:close()
    assert.same({ one, ids[1], "" }, payloads)
    assert.equal(151, pbus:listen(function() end, { max = 151, timeout = 20, batch = 50 }))
  end)

  it("settle an early ack with the next ack within a minute, and an older one with msgbus.prune", function()
    -- store's messages stay in its outbox meanwhile; acks replayed by hand as the
    -- apply worker runs them
    local sub = ("msgbus_%s_to_%s"):format(store.service, payments.service)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local function in_outbox(id)
      return env.scalar(store, "select count(*)::int8 from msgbus.messages where id = $1", id) == 1
    end
    -- two messages whose acks came early: one two minutes ago (a commit that waited
    -- that long to become visible, say for a synchronous standby), one just now
    local old, recent = env.scalar(store, "select gen_random_uuid()::text"), env.scalar(store, "select gen_random_uuid()::text")
    env.exec(store, "insert into msgbus.early_acks (id, receiver, at) values ($1, $2, now() - interval '2 minutes')",
      old, payments.service)
    env.exec(store, "insert into msgbus.early_acks (id, receiver) values ($1, $2)", recent, payments.service)
    for _, id in ipairs { old, recent } do
      env.exec(store, "insert into msgbus.messages (id, receiver, type, data) values ($1, $2, 'early', '{}')",
        id, payments.service)
      assert.is_true(sbus:wait_ack(id, 0))
    end
    -- the next ack settles the recent one only: an arriving ack does not look through
    -- every early ack ever kept
    local other = assert(sbus:send(payments.service, "other", {}))
    assert(env.arrive(store, payments, "msgbus.ack", other))
    assert.is_false(in_outbox(other))
    assert.is_false(in_outbox(recent))
    assert.is_true(in_outbox(old))
    assert.is_true(sbus:wait_ack(old, 0))
    assert.same({ { id = old } }, env.exec(store, "select id::text from msgbus.early_acks"))
    -- prune settles the rest
    env.exec(store, "select msgbus.prune()")
    assert.is_false(in_outbox(old))
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.early_acks"))
    env.exec(payments, "alter subscription " .. sub .. " enable")
    -- the slot still holds all three, which arrive now; their acks find nothing
    assert.equal(3, pbus:listen(function() end, { max = 3, timeout = 20 }))
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from msgbus.early_acks") == 3
    end, 30, "the three acks")
    env.exec(store, "delete from msgbus.early_acks")
  end)

  it("let install run again on a live service without a lock that arriving messages wait for", function()
    -- the apply worker holds the inbox while it writes a message and its ack; an
    -- upgrade's hello (or any message) can arrive while install runs
    local c = assert(core.connect(payments.conninfo))
    assert(c:exec("begin"))
    assert(c:exec(("lock table msgbus.to_%s in row exclusive mode"):format(payments.service)))
    local ok, err = msgbus.setup.install(payments.conninfo .. " options='-c lock_timeout=2000'", payments.service)
    assert(c:exec("rollback"))
    c:close()
    assert.is_true(ok, err)
  end)

  it("work with a peer on version 11 both ways, and switch on when it upgrades", function()
    local new, old = env.linked({ "mxnew", "mxold" }, { "a", "b" })
    env.wait_until(function() return batched(new, old) and batched(old, new) end, 30, "the link's hellos")
    -- old goes back to version 11: the inbox trigger of migration 007 (the last before
    -- 012 to replace it), nothing of 012's; new forgets old's hello
    local v7 = assert(io.open("sql/007_apply_cost.sql")):read("a")
    local trigger = v7:match("(create or replace function msgbus%.on_arrival%(%).-\nend %$%$;)")
    assert.is_string(trigger)
    local conn = assert(core.connect(old.conninfo))
    assert(conn:exec("begin"))
    assert(conn:script(trigger .. [[
      drop table msgbus.ack_flush;
      drop function msgbus.on_ack_flush(), msgbus.send_acks(text, text, text), msgbus.hello(text),
                    msgbus.settle_recent_early_acks();
      drop index msgbus.early_acks_at;
      alter table msgbus.peers drop column batched_acks;
      update msgbus.peers set packs = false;
      delete from msgbus.migrations where version >= 12]]))
    assert(conn:exec("commit"))
    conn:close()
    set_batched(new, old, false)
    env.exec(new, "update msgbus.peers set packs = false where service = $1", old.service)
    local nbus, obus = env.connect(new), env.connect(old)

    -- both ways, a transaction of many is acknowledged message by message
    local seen_new, _, stop_new = spy_acks(new)
    wait_acks(nbus, send_batch(nbus, old, 120))
    wait_acks(obus, send_batch(obus, new, 120))
    stop_new()
    assert.same({ { kind = "msgbus.ack", rows = 120, messages = 120 } }, seen_new())
    assert.equal(120, obus:listen(function() end, { max = 120, timeout = 20, batch = 50 }))
    assert.equal(120, nbus:listen(function() end, { max = 120, timeout = 20, batch = 50 }))

    -- a hello to version 11 is taken for an early ack (what 011 does with an ack of a
    -- message it cannot see) and not answered; the ack of a message sent after it
    -- comes back after any answer would have
    env.exec(new, "select msgbus.hello($1)", old.service)
    wait_acks(nbus, { assert(nbus:send(old.service, "after_hello", {})) })
    assert.equal(1, obus:listen(function() end, { max = 1, timeout = 20 }))
    assert.same({ { id = NIL_UUID } }, env.exec(old, "select id::text from msgbus.early_acks"))
    assert.is_false(batched(new, old))

    -- old upgrades: its hello switches both on, and it forgets the early ack
    assert(msgbus.setup.install(old.conninfo, old.service))
    env.wait_until(function() return batched(new, old) and batched(old, new) end, 30, "the upgrade's hellos")
    assert.equal(0, env.scalar(old, "select count(*)::int8 from msgbus.early_acks"))
    local seen, sizes, stop = spy_acks(new)
    wait_acks(nbus, send_batch(nbus, old, 120))
    stop()
    assert.same({ { kind = "msgbus.ack", rows = 1, messages = 1 },
                  { kind = "msgbus.acks", rows = 2, messages = 119 } }, seen())
    assert.same({ 100, 19 }, sizes())
    assert.equal(120, obus:listen(function() end, { max = 120, timeout = 20, batch = 50 }))
    nbus:close()
    obus:close()
  end)
end)
