-- The core promise, end to end over real clusters: send, ack, handle, reply.
local msgbus = require "msgbus"
local core = require "msgbus.core"
local env = require "helpers.env"

local outbox_count = env.outbox_count

local function inbox_count(svc)
  return env.scalar(svc, "select count(*)::int8 from msgbus.inbox")
end

describe("msgbus between two servers", function()
  local store, payments, sbus, pbus

  setup(function()
    store, payments = env.linked({ "store", "pay" }, { "a", "b" })
    sbus = env.connect(store)
    pbus = env.connect(payments)
  end)

  teardown(function()
    sbus:close()
    pbus:close()
  end)

  it("delivers a message, acknowledges it and hands it to the handler", function()
    local id = assert(sbus:send(payments.service, "charge", { usd = 100, user = 123 }))
    assert.matches("^%x+%-%x+%-%x+%-%x+%-%x+$", id)
    assert.is_true(sbus:wait_ack(id, 20))
    -- acked messages leave the outbox
    assert.equal(0, outbox_count(store, payments))
    local got
    assert.equal(1, pbus:listen(function(m) got = m end, { max = 1, timeout = 20 }))
    assert.equal(id, got.id)
    assert.equal("charge", got.type)
    assert.equal(store.service, got.sender)
    assert.equal(payments.service, got.receiver)
    assert.equal(123, got.data.user)
    assert.equal("integer", math.type(got.data.user))
    assert.is_string(got.sent_at)
    assert.is_string(got.received_at)
    -- consumed messages leave the inbox, and the ack left the receiver's outbox
    assert.equal(0, inbox_count(payments))
    assert.equal(0, outbox_count(payments, store))
  end)

  it("keeps data exactly as sent", function()
    local data = {
      big = math.maxinteger, small = math.mininteger, exact = 123456789012345,
      float = 0.1, third = 1 / 3, whole_float = 2.0, tiny = 5e-324,
      text = "zürich \1 \"quoted\" \n \\u0000", list = { 1, "two", { three = 3 } },
      empty = setmetatable({}, msgbus.array_mt), nested = { a = { b = { c = true } } },
      null = msgbus.null,
    }
    local id = assert(sbus:send(payments.service, "exact", data))
    local got
    pbus:listen(function(m) got = m end, { max = 1, timeout = 20 })
    assert.equal(id, got.id)
    assert.same(data, got.data)
    assert.equal("integer", math.type(got.data.big))
    assert.equal("float", math.type(got.data.whole_float))
    assert.equal(0, #got.data.empty)
    assert.equal("[]", msgbus.encode(got.data.empty))
  end)

  it("gives messages version 7 ids: the sender's milliseconds first, so they grow with time", function()
    local prev = ""
    local ids = {}
    for i = 1, 20 do
      ids[i] = assert(sbus:send(payments.service, "ordered", { i = i }))
      -- version 7, variant 10xx
      assert.matches("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-7%x%x%x%-[89ab]%x%x%x%-%x+$", ids[i])
      local ms = ids[i]:sub(1, 8) .. ids[i]:sub(10, 13)
      assert.is_true(ms >= prev, ms .. " after " .. prev)
      prev = ms
    end
    -- the prefix is the time of the insert, in milliseconds since 1970 (the last ack
    -- means all have arrived: one apply worker brings them in order)
    assert.is_true(sbus:wait_ack(ids[20], 20))
    local rows = assert(pbus:exec([[select id::text, ('x' || lpad(left(replace(id::text, '-', ''), 12), 16, '0'))::bit(64)::bigint
                                           - (extract(epoch from sent_at) * 1000)::bigint as skew
                                      from msgbus.inbox where id = any ($1::uuid[])]],
                                  "{" .. table.concat(ids, ",") .. "}"))
    assert.equal(20, #rows)
    for _, r in ipairs(rows) do assert.is_true(math.abs(r.skew) <= 1000, r.id .. " skew " .. r.skew) end
    assert.equal(20, pbus:listen(function() end, { max = 20, timeout = 20 }))
  end)

  it("wait_ack returns true when the ack came back before the call", function()
    local id = assert(sbus:send(payments.service, "early", {}))
    env.wait_until(function() return outbox_count(store, payments) == 0 end, 20, "the ack")
    assert.is_true(sbus:wait_ack(id, 0))
    assert.equal(1, pbus:listen(function() end, { max = 1, timeout = 20 }))
  end)

  it("wait_ack times out while the receiver does not take the message", function()
    local sub = ("msgbus_%s_to_%s"):format(store.service, payments.service)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local id = assert(sbus:send(payments.service, "held", { n = 1 }))
    local t0 = core.now()
    local ok, err, code = sbus:wait_ack(id, 0.3)
    assert.is_nil(ok)
    assert.equal("timeout", code)
    assert.matches("timeout", err)
    assert.is_true(core.now() - t0 >= 0.3)
    env.exec(payments, "alter subscription " .. sub .. " enable")
    assert.is_true(sbus:wait_ack(id, 30))
    assert.equal(1, pbus:listen(function() end, { max = 1, timeout = 20 }))
  end)

  it("counts an ack that arrived before its message was visible, and settles it later", function()
    -- the race: the peer's ack is applied here before the sending transaction is
    -- visible to the apply worker; replayed by hand as the apply worker would run it
    local sub = ("msgbus_%s_to_%s"):format(store.service, payments.service)
    env.exec(payments, "alter subscription " .. sub .. " disable")
    local early = env.scalar(store, "select gen_random_uuid()::text")
    local function apply_ack(id)
      assert(env.arrive(store, payments, "msgbus.ack", id))
    end
    apply_ack(early)
    assert.equal(1, env.scalar(store, "select count(*)::int8 from msgbus.early_acks where id = $1", early))
    -- now the message itself becomes visible in the outbox
    env.exec(store, [[insert into msgbus.messages (id, receiver, type, data) values ($1, $2, 'early', '{}')]],
             early, payments.service)
    assert.is_true(sbus:wait_ack(early, 0))
    assert.equal(1, outbox_count(store, payments))
    -- the next ack to arrive removes both
    local other = assert(sbus:send(payments.service, "other", {}))
    apply_ack(other)
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.early_acks"))
    assert.equal(0, outbox_count(store, payments))
    env.exec(payments, "alter subscription " .. sub .. " enable")
    -- "other" really travels now; take it so the next tests start clean
    assert.equal(1, pbus:listen(function(m) assert(m.id == other) end, { max = 1, timeout = 20 }))
  end)

  -- Until `fd` is readable (true), or 20 s went by (false).
  local function readable(fd)
    local uv = require "luv"
    local poll, timer, ok = uv.new_poll(fd), uv.new_timer(), false
    poll:start("r", function() ok = true; poll:stop(); timer:stop() end)
    timer:start(20000, 0, function() poll:stop() end)
    uv.run()
    poll:close(); timer:close(); uv.run("nowait")
    return ok
  end

  -- Wraps a bus's connection: hooks[name](real, ...) runs in place of
  -- conn:name(...). Returns the function that puts the connection back.
  local function wrap(bus, hooks)
    local real = bus.conn
    bus.conn = setmetatable({}, { __index = function(_, k)
      local f = hooks[k] or real[k]
      return function(_, ...) return f(real, ...) end
    end })
    return function() bus.conn = real end
  end

  -- A run hook for wrap that counts the statements run, by name, in `calls`.
  local function counting(calls)
    return function(real, name, ...)
      calls[name] = (calls[name] or 0) + 1
      return real:run(name, ...)
    end
  end

  -- A run hook for wrap: after the answer of statement `stmt`, place(id) (id: the
  -- message it sent) writes what notifies the bus, the test waits until that is at
  -- the bus's socket, and one more statement reads it, as if it had come with the
  -- answer.
  local function with_answer(stmt, place)
    return function(real, name, ...)
      local rows, err, code = real:run(name, ...)
      if name == stmt and rows then
        place(rows[1].id)
        assert.is_true(readable(real:socket()), "the notification to reach the bus")
        assert(real:exec("select 1"))
      end
      return rows, err, code
    end
  end

  it("wait_ack right after a send waits for the ack's notification, which names the message", function()
    local s, r = env.linked({ "wfs", "wfr" }, { "a", "b" })
    local bus = env.connect(s)
    -- the link's workers are running (a new link's first ack can take seconds, and a
    -- wait asks again every 5 s)
    assert.is_true(bus:wait_ack(assert(bus:send(r.service, "warm", {})), 30))
    local calls = {}
    local restore = wrap(bus, { run = counting(calls) })
    local id = assert(bus:send(r.service, "first", {}))
    -- (unless the ack's notification came with the send's answer: then it asks first)
    local came = bus.unseen == nil
    calls.acked = 0
    assert.is_true(bus:wait_ack(id, 30))
    assert.equal(came and 1 or 0, calls.acked)
    -- an ack that came before wait_ack was called is still found, even with no time to
    -- wait: read from the socket if its notification is there, else asked
    local late = assert(bus:send(r.service, "second", {}))
    came = bus.unseen == nil
    assert(env.poll(function() return outbox_count(s, r) == 0 end, 30), "the ack of the second message")
    calls.acked = 0
    assert.is_true(bus:wait_ack(late, 0))
    local asks = calls.acked
    assert.is_true(asks == 0 and not came or asks == 1, ("msgbus.acked ran %d times"):format(asks))
    -- and a wait that follows anything else asks first, as always
    assert(bus:exec("select 1"))
    calls.acked = 0
    assert.is_true(bus:wait_ack(late, 0))
    assert.equal(1, calls.acked)
    restore()
    bus:close()
  end)

  -- The channels a bus's session listens on, in order, space-separated.
  local function channels(bus)
    return assert(bus:exec([[select coalesce(string_agg(c, ' ' order by c), '') as c
                               from pg_listening_channels() c]]))[1].c
  end

  it("listens only once it waits, on what it waits for, and again after a reconnect", function()
    local ch = "msgbus_" .. store.service
    local b = env.connect(store)
    -- a bus that only sends is not woken by its service's notifications
    local id = assert(b:send(payments.service, "fire", {}))
    assert.equal("", channels(b))
    assert.is_true(b:wait_ack(id, 20))
    assert.equal(ch .. "_ack", channels(b))
    local asked = assert(b:send(payments.service, "ping", {}, { await_reply = true }))
    -- (the first message is taken too)
    assert.equal(2, pbus:listen(function(m)
      if m.type == "ping" then assert(pbus:reply(m, "pong", {})) end
    end, { max = 2, timeout = 20 }))
    assert.equal(asked, assert(b:wait_reply(asked, 20)).reply)
    assert.equal(ch .. "_ack " .. ch .. "_reply", channels(b))
    assert.equal(0, b:listen(function() end, { timeout = 0 }))
    assert.equal(ch .. " " .. ch .. "_ack " .. ch .. "_reply", channels(b))
    -- a new session listens where the old one did
    local old_pid = b.conn:backend_pid()
    assert.is_true(env.scalar(store, "select pg_terminate_backend($1, 10000)", old_pid))
    env.wait_until(function() return b:exec("select 1") end, 20, "the bus to reconnect")
    assert.are_not.equal(old_pid, b.conn:backend_pid())
    assert.equal(ch .. " " .. ch .. "_ack " .. ch .. "_reply", channels(b))
    b:close()
    -- an event loop's socket becomes readable when messages arrive
    local e = env.connect(store)
    assert.equal("integer", math.type(e:pollfd()))
    assert.equal(ch, channels(e))
    e:close()
  end)

  -- Every ack of a service notifies each bus of it that listens for acks; libpq keeps
  -- what it reads with a statement's answer until the bus next waits.
  it("keeps no notifications while it only sends, and stops listening for acks after 1,000 went by", function()
    local x, y = env.linked({ "nsend", "nrecv" }, { "a", "b" })
    local b = env.connect(x)
    local ch = "msgbus_" .. x.service .. "_ack"
    assert.is_true(b:wait_ack(assert(b:send(y.service, "first", {})), 20))
    assert.equal(ch, channels(b))
    local kept = 0
    for i = 1, 1100 do
      assert(b:send(y.service, "bulk", { i = i }))
      kept = math.max(kept, #b.conn:queued())
    end
    assert.equal(0, kept)
    env.wait_until(function() return outbox_count(x, y) == 0 end, 60, "the acks")
    -- (the acks' last notifications come with this answer)
    assert(b:exec("select 1"))
    assert.equal("", channels(b))
    -- wait_ack listens again, and an ack ends it as before
    assert.is_true(b:wait_ack(assert(b:send(y.service, "again", {})), 20))
    assert.equal(ch, channels(b))
    b:close()
  end)

  -- A bus of `svc` that listens for replies (its wait_reply timed out), and the channel.
  local function listening_for_replies(svc)
    local b = env.connect(svc)
    local ch = "msgbus_" .. svc.service .. "_reply"
    local _, _, code = b:wait_reply("00000000-0000-4000-8000-000000000001", 0.01)
    assert.equal("timeout", code)
    assert.equal(ch, channels(b))
    return b, ch
  end

  it("stops listening for replies after 1,000 went by since its last wait_reply, and listens again to wait", function()
    local b, ch = listening_for_replies(store)
    -- 1,100 notifications on the channel, as 1,100 replies to the service would send
    env.exec(store, "select pg_notify($1, g::text) from generate_series(1, 1100) g", ch)
    env.wait_until(function() return channels(b) == "" end, 20, "the bus to stop listening for replies")
    assert.equal(0, #b.conn:queued())
    local _, _, code = b:wait_reply("00000000-0000-4000-8000-000000000001", 0.01)
    assert.equal("timeout", code)
    assert.equal(ch, channels(b))
    b:close()
  end)

  -- Notifications sent while the UNLISTEN is on its way come with its answer. The
  -- test puts one there: just before the UNLISTEN goes out, another session notifies
  -- the channel and the test waits until the notification is at the bus's socket.
  it("keeps none of the notifications that come with its UNLISTEN's answer", function()
    local b, ch = listening_for_replies(store)
    local unlistens = 0
    local restore = wrap(b, { exec = function(real, sql, ...)
      if sql:match("^unlisten ") then
        unlistens = unlistens + 1
        env.exec(store, "select pg_notify($1, 'late')", ch)
        assert.is_true(readable(real:socket()), "the late notification to reach the bus")
      end
      return real:exec(sql, ...)
    end })
    -- one notification short of the count, then the one that makes the next call unlisten
    b.dropped.reply = 999
    env.exec(store, "select pg_notify($1, 'last')", ch)
    assert.is_true(readable(b.conn:socket()), "the notification to reach the bus")
    assert(b:exec("select 1"))
    assert.equal(1, unlistens)
    assert.equal(0, #b.conn:queued())
    restore()
    assert.equal("", channels(b))
    b:close()
  end)

  local function uuid(svc) return env.scalar(svc, "select gen_random_uuid()::text") end

  -- Every ack of a service notifies each of its buses that wait: a bus asks the
  -- server whether its message was acked only when a notification may be its ack's.
  it("asks after an ack only when the ack may be its message's", function()
    local x, y = env.linked({ "wake", "wakr" }, { "a", "b" })
    local b = env.connect(x)
    assert.is_true(b:wait_ack(assert(b:send(y.service, "first", {})), 30))
    -- the message stays in the outbox until the test applies its ack by hand
    local sub = ("msgbus_%s_to_%s"):format(x.service, y.service)
    env.exec(y, "alter subscription " .. sub .. " disable")
    local calls, waits, id = { acked = 0 }, 0, nil
    local restore = wrap(b, {
      run = counting(calls),
      wait = function(real, ...)
        waits = waits + 1
        if waits > 2 then return real:wait(...) end
        -- as the apply worker writes acks: first a transaction with another
        -- message's ack, which names that one; then one with another's and this one's,
        -- whose second only an unnamed notification tells
        env.arrive_all(x, y, "msgbus.ack", waits == 1 and { uuid(x) } or { uuid(x), id })
        assert.is_true(readable(real:socket()), "the ack's notification to reach the bus")
        return real:wait(...)
      end,
    })
    id = assert(b:send(y.service, "held", {}))
    assert.is_true(b:wait_ack(id, 30))
    restore()
    -- it waited, woke on the other message's ack and waited again without asking,
    -- then woke on the unnamed one and asked once
    assert.equal(2, waits)
    assert.equal(1, calls.acked)
    assert.equal(0, outbox_count(x, y))
    env.exec(y, "alter subscription " .. sub .. " enable")
    b:close()
  end)

  -- Every reply to a service notifies each of its buses that wait for a reply (version
  -- 16: the first of a transaction names its message, as acks do).
  it("wait_reply looks for its reply only when a notification may be of it", function()
    local x, y = env.linked({ "rwake", "rwakr" }, { "a", "b" })
    local b = env.connect(x)
    -- the bus listens for acks too, as one that waited for an ack does
    assert.is_true(b:wait_ack(assert(b:send(y.service, "first", {})), 30))
    local id = uuid(x)
    local ack_ch = "msgbus_" .. x.service .. "_ack"
    local calls, waits = { take_reply = 0 }, 0
    local restore = wrap(b, {
      run = counting(calls),
      wait = function(real, ...)
        waits = waits + 1
        if waits == 1 then
          -- an ack of another message
          env.exec(x, "select pg_notify($1, gen_random_uuid()::text)", ack_ch)
        elseif waits == 2 then
          -- a transaction with a reply to another message, which names that one
          env.arrive_all(x, y, "answer", { uuid(x) })
        elseif waits == 3 then
          -- one with a reply to another message and then this one's, which only an
          -- unnamed notification tells
          env.arrive_all(x, y, "answer", { uuid(x), id })
        end
        if waits <= 3 then
          assert.is_true(readable(real:socket()), "the notification to reach the bus")
        end
        return real:wait(...)
      end,
    })
    local msg = assert(b:wait_reply(id, 30))
    restore()
    assert.equal("answer", msg.type)
    assert.equal(id, msg.reply)
    -- looked before it waited and after the unnamed notification; not after the
    -- ack's, nor after the reply that named another message
    assert.equal(3, waits)
    assert.equal(2, calls.take_reply)
    -- the replies to the other messages are the listeners'
    assert.equal(2, b:listen(function(m) assert.equal("answer", m.type) end, { max = 2, timeout = 20 }))
    b:close()
  end)

  -- send { await_reply = true } on a bus that listens for replies already, then
  -- wait_reply: its session holds the wait and the reply's notification cannot be
  -- missed, so it waits first and looks once, on the notification.
  it("wait_reply right after a send with await_reply waits before it looks", function()
    local x, y = env.linked({ "rfast", "rfasr" }, { "a", "b" })
    local b, yb = env.connect(x), env.connect(y)
    local function answer()
      assert.equal(1, yb:listen(function(m) assert(yb:reply(m, "answer", { to = m.data.n })) end,
                                { max = 1, timeout = 20 }))
    end
    -- the first request: the bus starts listening for replies in its wait_reply
    local first = assert(b:send(y.service, "ask", { n = 1 }, { await_reply = true }))
    answer()
    assert.equal(1, assert(b:wait_reply(first, 30)).data.to)
    local calls, waits = {}, 0
    local restore = wrap(b, {
      run = counting(calls),
      wait = function(real, ...)
        waits = waits + 1
        if waits == 1 then
          answer()
          assert.is_true(readable(real:socket()), "the reply's notification to reach the bus")
        end
        return real:wait(...)
      end,
    })
    local id = assert(b:send(y.service, "ask", { n = 2 }, { await_reply = true }))
    assert.equal(2, assert(b:wait_reply(id, 30)).data.to)
    restore()
    assert.equal(1, waits)
    assert.is_nil(calls.wait_add)
    assert.equal(1, calls.take_reply)
    -- after anything else in between, it registers and looks first, as always
    local again = assert(b:send(y.service, "ask", { n = 3 }, { await_reply = true }))
    assert(b:exec("select 1"))
    answer()
    calls = {}
    restore = wrap(b, { run = counting(calls) })
    assert.equal(3, assert(b:wait_reply(again, 30)).data.to)
    restore()
    assert.equal(1, calls.wait_add)
    assert.is_true(calls.take_reply >= 1)
    b:close(); yb:close()
  end)

  it("wait_reply looks at once when the reply's notification came with its send's answer", function()
    local x, y = env.linked({ "rcame", "rcamr" }, { "a", "b" })
    local b = listening_for_replies(x)
    local waits = 0
    local restore = wrap(b, {
      run = with_answer("send_await", function(id) assert(env.arrive(x, y, "answer", id, '{"n": 7}')) end),
      wait = function(real, ...) waits = waits + 1; return real:wait(...) end,
    })
    local id = assert(b:send(y.service, "ask", {}, { await_reply = true }))
    assert.equal(7, assert(b:wait_reply(id, 30)).data.n)
    restore()
    assert.equal(0, waits)
    b:close()
  end)

  -- On a loaded machine the whole way to the receiver and back can fit between the
  -- server's answer to a send and the client's read of it, and libpq then parses the
  -- ack's notification with the answer. The test puts it there: the send's answer
  -- is read, the ack applied by hand, and one more statement reads its notification.
  it("wait_ack asks at once when the ack's notification came with its send's answer", function()
    local x, y = env.linked({ "wcame", "wcamr" }, { "a", "b" })
    local b = env.connect(x)
    assert.is_true(b:wait_ack(assert(b:send(y.service, "first", {})), 30))
    local sub = ("msgbus_%s_to_%s"):format(x.service, y.service)
    env.exec(y, "alter subscription " .. sub .. " disable")
    local waits = 0
    local restore = wrap(b, {
      run = with_answer("send", function(id) assert(env.arrive(x, y, "msgbus.ack", id)) end),
      wait = function(real, ...) waits = waits + 1; return real:wait(...) end,
    })
    local id = assert(b:send(y.service, "held", {}))
    assert.is_true(b:wait_ack(id, 30))
    restore()
    assert.equal(0, waits)
    env.exec(y, "alter subscription " .. sub .. " enable")
    b:close()
  end)

  it("keeps no pile of notifications while its inbox never runs empty", function()
    local x, y = env.linked({ "nfeed", "nbusy" }, { "a", "b" })
    local sx, ly = env.connect(x), env.connect(y)
    assert(sx:transaction(function()
      for i = 1, 300 do assert(sx:send(y.service, "work", { i = i })) end
    end))
    env.wait_until(function() return env.scalar(y, "select count(*)::int8 from msgbus.inbox") == 300 end, 30, "the backlog")
    -- each message handled brings another, one transaction each: 2,000 notifications
    -- of new messages while the backlog stays about 300
    local n = 0
    assert.equal(2000, ly:listen(function()
      n = n + 1
      assert(sx:send(y.service, "work", { i = 300 + n }))
    end, { max = 2000 }))
    assert.is_true(env.scalar(y, "select count(*)::int8 from msgbus.inbox") > 0, "the inbox ran empty")
    -- what the listener's connection holds now: at most those of its last run of
    -- claims (500 messages), not all of them
    local held = #assert(ly.conn:notifications())
    assert.is_true(held < 1000, ("the connection holds %d notifications"):format(held))
    sx:close(); ly:close()
  end)

  it("answers bus:timeout() with 0 when a statement read a notification that the socket will not tell", function()
    local x, y = env.linked({ "nevs", "nevr" }, { "a", "b" })
    local e = env.connect(y)
    assert.equal("integer", math.type(e:pollfd()))
    assert.is_nil(e:timeout())
    local sb = env.connect(x)
    assert.is_true(sb:wait_ack(assert(sb:send(y.service, "tick", {})), 20))
    sb:close()
    -- the inbox's notification reaches e's socket, and this statement reads it there
    assert.equal(1, assert(e:exec("select count(*)::int8 as n from msgbus.inbox"))[1].n)
    assert.equal(0, e:timeout())
    local got
    assert.equal(1, e:step(function(m) got = m.type end))
    assert.equal("tick", got)
    assert.is_nil(e:timeout())
    e:close()
  end)

  it("commits a transaction of acks without waiting for its fsync, and one with a message with it", function()
    -- incoming transactions replayed by hand as the apply worker runs them, rolled back
    local c = assert(core.connect(store.conninfo))
    local inbox = "msgbus.to_" .. store.service
    local function sync() return assert(c:exec("select current_setting('synchronous_commit') as s"))[1].s end
    local function ack()
      assert(c:exec(("insert into %s (sender, receiver, type, reply) values ($1, $2, 'msgbus.ack', gen_random_uuid())")
        :format(inbox), payments.service, store.service))
    end
    local function message()
      assert(c:exec(("insert into %s (sender, receiver, type, data) values ($1, $2, 'm', '{}')"):format(inbox),
        payments.service, store.service))
    end
    -- each step, then synchronous_commit after it
    for _, steps in ipairs { { ack, "off", ack, "off", message, "on", ack, "on" }, { message, "on", ack, "on" } } do
      assert(c:exec("begin"))
      assert(c:exec("set local session_replication_role = replica"))
      assert.equal("on", sync())
      for i = 1, #steps, 2 do
        steps[i]()
        assert.equal(steps[i + 1], sync())
      end
      assert(c:exec("rollback"))
      assert.equal("on", sync())
    end
    c:close()
    assert.equal(0, inbox_count(store))
  end)

  it("sends atomically with the service's own writes, and not at all on failure", function()
    sbus:exec("create table if not exists orders (id serial primary key, total int)")
    local id = assert(sbus:transaction(function()
      assert(sbus:exec("insert into orders (total) values ($1)", 42))
      return assert(sbus:send(payments.service, "order", { total = 42 }))
    end))
    assert.is_true(sbus:wait_ack(id, 20))

    local before = env.scalar(store, "select count(*)::int8 from orders")
    local ok, err = sbus:transaction(function()
      assert(sbus:exec("insert into orders (total) values ($1)", 7))
      assert(sbus:send(payments.service, "order", { total = 7 }))
      error("the order failed")
    end)
    assert.is_nil(ok)
    assert.matches("the order failed", err)
    assert.equal(before, env.scalar(store, "select count(*)::int8 from orders"))
    assert.equal(0, outbox_count(store, payments))

    -- only the committed one arrives
    local seen = {}
    pbus:listen(function(m) seen[#seen + 1] = m.data.total end, { timeout = 0.5 })
    assert.same({ 42 }, seen)
  end)

  it("refuses an unknown receiver with an error naming it, writing nothing", function()
    local ok, err, code = sbus:send("nobody_here", "x", {})
    assert.is_nil(ok)
    assert.equal("MB001", code)
    assert.matches("nobody_here", err)
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.messages"))
  end)

  it("rolls back a failing handler, counts the attempt and retries", function()
    pbus:exec("create table if not exists charges (msg uuid primary key)")
    local id = assert(sbus:send(payments.service, "flaky", { n = 1 }))
    local calls = 0
    local count = pbus:listen(function(m)
      calls = calls + 1
      assert(pbus:exec("insert into charges (msg) values ($1)", m.id))
      if calls == 1 then error("first attempt fails") end
    end, { max = 1, timeout = 20 })
    assert.equal(1, count)
    assert.equal(2, calls)
    -- the first attempt's insert was rolled back, the second's committed once
    assert.equal(1, env.scalar(payments, "select count(*)::int8 from charges where msg = $1", id))
    assert.equal(0, inbox_count(payments))
  end)

  it("send_many sends a list in one statement, in order, all or none", function()
    local list = {}
    for i = 1, 500 do list[i] = { i = i, big = 9007199254740993 } end
    local ids = assert(sbus:send_many(payments.service, "many", list))
    assert.equal(500, #ids)
    assert.is_true(sbus:wait_ack(ids[500], 30))
    local got = {}
    assert.equal(500, pbus:listen(function(m)
      assert.equal(9007199254740993, m.data.big)
      got[#got + 1] = m.id
    end, { max = 500, batch = 50, timeout = 10 }))
    assert.same(ids, got)
    -- one bad receiver: nothing is sent
    local ok, err, code = sbus:send_many("nobody", "many", list)
    assert.is_nil(ok)
    assert.equal("MB001", code)
    assert.matches("nobody", err)
    local big = { {}, { pad = ("x"):rep(9 * 1024 * 1024) } }
    ok, err, code = sbus:send_many(payments.service, "many", big)
    assert.is_nil(ok)
    assert.equal("too_large", code)
    assert.matches("element 2", err)
    assert.equal(0, outbox_count(store, payments))
  end)

  it("commits a handled message even when the claim of the next one, sent with it, fails", function()
    -- listen sends a message's done and commit and the next claim in one round trip
    local ids = {}
    assert(sbus:transaction(function()
      for i = 1, 3 do ids[i] = assert(sbus:send(payments.service, "chain", { i = i })) end
    end))
    assert.is_true(sbus:wait_ack(ids[3], 20))
    local bus = env.connect(payments)
    local calls = {}
    local n, err, code = bus:listen(function(m)
      calls[#calls + 1] = m.data.i
      -- from the next transaction on, the claim's FOR UPDATE is refused
      if m.data.i == 1 then assert(bus:exec("set default_transaction_read_only = on")) end
    end, { max = 3, timeout = 5 })
    assert.is_nil(n)
    assert.equal("25006", code)
    assert.matches("read%-only transaction", err)
    assert.same({ 1 }, calls)
    -- 1 is consumed, once; 2 and 3 wait, untouched
    assert.equal(2, inbox_count(payments))
    assert.equal(0, env.scalar(payments, "select count(*)::int8 from msgbus.inbox where id = $1", ids[1]))
    assert.equal(0, env.scalar(payments, "select coalesce(sum(attempts), 0)::int8 from msgbus.inbox"))
    assert(bus:exec("reset default_transaction_read_only"))
    assert.equal(2, bus:listen(function(m) calls[#calls + 1] = m.data.i end, { max = 2, timeout = 5 }))
    assert.same({ 1, 2, 3 }, calls)
    bus:close()
  end)

  it("fails a message whose handler caught the error of its own statement, one transaction each", function()
    pbus:exec("create table if not exists single_caught (msg uuid primary key, i int)")
    local ids = {}
    assert(sbus:transaction(function()
      for i = 1, 3 do ids[i] = assert(sbus:send(payments.service, "caught", { i = i })) end
    end))
    assert.is_true(sbus:wait_ack(ids[3], 20))
    local calls = {}
    assert.equal(3, pbus:listen(function(m)
      calls[#calls + 1] = m.data.i
      assert(pbus:exec("insert into single_caught values ($1, $2)", m.id, m.data.i))
      if m.data.i == 2 and #calls == 2 then
        local ok = pbus:exec("select 1/0")
        assert.is_nil(ok)
      end
    end, { max = 3, timeout = 10 }))
    -- 2's first attempt was rolled back and counted, then 2 again, then 3
    assert.same({ 1, 2, 2, 3 }, calls)
    assert.equal(3, env.scalar(payments, "select count(*)::int8 from single_caught"))
    assert.equal(0, inbox_count(payments))
  end)

  it("hands messages from one sender over in send order", function()
    local n = 300
    assert(sbus:transaction(function()
      for i = 1, n / 2 do assert(sbus:send(payments.service, "seq", { i = i })) end
    end))
    for i = n / 2 + 1, n do assert(sbus:send(payments.service, "seq", { i = i })) end
    local got = {}
    pbus:listen(function(m) got[#got + 1] = m.data.i end, { max = n, timeout = 20 })
    assert.equal(n, #got)
    for i = 1, n do assert.equal(i, got[i]) end
  end)

  describe("listen with opts.batch", function()
    -- n "seq" messages, all in the payments inbox before listen starts
    local function fill(n, mtype, data)
      local ids = {}
      assert(sbus:transaction(function()
        for i = 1, n do ids[i] = assert(sbus:send(payments.service, mtype or "seq", data and data(i) or { i = i })) end
      end))
      env.wait_until(function() return inbox_count(payments) == n end, 30, "the messages to arrive")
      return ids
    end

    it("hands every message over once, in send order, and respects max", function()
      fill(25)
      local got = {}
      assert.equal(25, pbus:listen(function(m) got[#got + 1] = m.data.i end, { batch = 10, max = 25, timeout = 5 }))
      assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25 }, got)
      assert.equal(0, inbox_count(payments))
      fill(7)
      got = {}
      assert.equal(5, pbus:listen(function(m) got[#got + 1] = m.data.i end, { batch = 64, max = 5 }))
      assert.same({ 1, 2, 3, 4, 5 }, got)
      assert.equal(2, inbox_count(payments))
      assert.equal(2, pbus:listen(function() end, { batch = 64, timeout = 0.2 }))
    end)

    it("rolls back only the failing handler's work; the rest of the batch commits", function()
      pbus:exec("create table if not exists batch_effects (msg uuid primary key, i int)")
      fill(10)
      local calls, order = {}, {}
      local count = pbus:listen(function(m)
        calls[m.data.i] = (calls[m.data.i] or 0) + 1
        order[#order + 1] = m.data.i
        assert(pbus:exec("insert into batch_effects values ($1, $2)", m.id, m.data.i))
        if m.data.i == 4 and calls[4] == 1 then error("first attempt of 4 fails") end
      end, { batch = 10, max = 10, timeout = 10 })
      assert.equal(10, count)
      assert.equal(2, calls[4])
      for i = 1, 10 do if i ~= 4 then assert.equal(1, calls[i]) end end
      -- the sender's later messages wait for 4's retry: its order holds
      assert.same({ 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10 }, order)
      -- one effect per message: the failed attempt's insert was rolled back
      assert.equal(10, env.scalar(payments, "select count(*)::int8 from batch_effects"))
      assert.equal(0, inbox_count(payments))
    end)

    it("fails a message whose handler caught the error of its own statement; the rest commit once", function()
      pbus:exec("create table if not exists batch_caught (msg uuid primary key, i int)")
      local ids = fill(6)
      local calls = {}
      local count = pbus:listen(function(m)
        calls[m.data.i] = (calls[m.data.i] or 0) + 1
        assert(pbus:exec("insert into batch_caught values ($1, $2)", m.id, m.data.i))
        if m.data.i == 2 and calls[2] == 1 then
          -- the error comes back as a value and the handler returns normally, but
          -- the statement aborted the work of this message
          local ok, err = pbus:exec("select 1/0")
          assert.is_nil(ok)
          assert.matches("division by zero", err)
        end
      end, { batch = 10, max = 6, timeout = 10 })
      assert.equal(6, count)
      -- 2 was tried twice, every other message once: the batch was not thrown away
      assert.same({ 1, 2, 1, 1, 1, 1 }, calls)
      assert.equal(6, env.scalar(payments, "select count(*)::int8 from batch_caught"))
      assert.equal(0, inbox_count(payments))
      assert.equal(0, env.scalar(payments, "select count(*)::int8 from msgbus.dead_letters where id = $1", ids[2]))
    end)

    it("when the batch's commit fails, finds the message that made it fail, one transaction each", function()
      local bus = env.connect(payments, { max_attempts = 1 })
      bus:exec("create table if not exists batch_keys (k int unique deferrable initially deferred)")
      -- the third message's write breaks a constraint checked only at commit
      local ids = fill(5, "keyed", function(i) return { k = i == 3 and 2 or i } end)
      local count = bus:listen(function(m)
        assert(bus:exec("insert into batch_keys values ($1)", m.data.k))
      end, { batch = 10, timeout = 0.5 })
      assert.equal(4, count)
      assert.same({ { k = 1 }, { k = 2 }, { k = 4 }, { k = 5 } },
        env.exec(payments, "select k from batch_keys order by k"))
      local dead = env.exec(payments, "select id::text as id, reason, last_error from msgbus.dead_letters where id = $1", ids[3])[1]
      assert.equal("failed", dead.reason)
      assert.matches("duplicate key", dead.last_error)
      assert.equal(0, inbox_count(payments))
      bus:close()
    end)

    it("refuses a batch size that is not an integer from 1 to 1000", function()
      for _, b in ipairs { 0, 1001, 1.5, "10", true } do
        assert.has_error(function() pbus:listen(function() end, { batch = b, timeout = 0 }) end,
          "msgbus: bad argument #2 to 'listen' (opts.batch must be an integer from 1 to 1000)")
      end
    end)

    it("puts at most 64 handlers that use the database in one batch, and all of a big batch's others", function()
      fill(150)
      -- each handler notes the transaction it ran in
      local sizes, got = env.listen_tx_sizes(pbus, { batch = 1000, max = 150, timeout = 5 })
      assert.same({ 22, 64, 64 }, sizes)
      assert.equal(150, #got)
      for i = 1, 150 do assert.equal(i, got[i]) end
      -- handlers that do not touch the database: one transaction for all of them, so
      -- while the last one runs, none has left the inbox yet
      fill(150)
      local c = assert(core.connect(payments.conninfo))
      local left
      assert.equal(150, pbus:listen(function(m)
        if m.data.i == 150 then left = assert(c:exec("select count(*)::int8 as n from msgbus.inbox"))[1].n end
      end, { batch = 1000, max = 150, timeout = 5 }))
      c:close()
      assert.equal(150, left)
      assert.equal(0, inbox_count(payments))
    end)
  end)

  it("routes a reply to wait_reply, never to a listen handler", function()
    local id = assert(sbus:send(payments.service, "quote", { item = "book" }, { await_reply = true }))
    assert.equal(1, pbus:listen(function(m)
      assert(pbus:reply(m, "quoted", { price = 12.5, item = m.data.item }))
    end, { max = 1, timeout = 20 }))
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from msgbus.inbox where reply = $1", id) == 1
    end, 20, "the reply")
    -- a listener running now must not take it, and does not spin on it either: it
    -- looks again once a second (or at a notification), here for 2.5 s
    local bus = env.connect(store)
    local idx = getmetatable(bus.conn).__index
    local script, exec, calls = idx.script, idx.exec, 0
    idx.script = function(...) calls = calls + 1; return script(...) end
    idx.exec = function(...) calls = calls + 1; return exec(...) end
    local ok, n = pcall(bus.listen, bus, function() error("listen got the reply") end, { timeout = 2.5 })
    idx.script, idx.exec = script, exec
    assert(ok, n)
    assert.equal(0, n)
    -- each look is a claim, its commit with next_due, and forget_orphaned_waits
    assert.is_true(calls <= 15, ("%d round trips in 2.5 s"):format(calls))
    assert.equal(1, bus:timeout())
    bus:close()
    local r = assert(sbus:wait_reply(id, 20))
    assert.equal(id, r.reply)
    assert.equal("quoted", r.type)
    assert.equal(12.5, r.data.price)
    assert.equal(payments.service, r.sender)
    assert.equal(0, inbox_count(store))
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.waits"))
  end)

  it("wait_reply without await_reply also works, and times out cleanly", function()
    local id = assert(sbus:send(payments.service, "ping", {}))
    local ok, _, code = sbus:wait_reply(id, 0.1)
    assert.is_nil(ok)
    assert.equal("timeout", code)
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.waits"))
    pbus:listen(function(m) assert(pbus:reply(m, "pong", {})) end, { max = 1, timeout = 20 })
    local r = assert(sbus:wait_reply(id, 20))
    assert.equal("pong", r.type)
  end)

  it("a reconnected bus keeps its waits; a listener forgets only the waits whose session is gone", function()
    local waiter, leaver = env.connect(store), env.connect(store)
    -- (the orphan's reply comes first: a reply held for a wait also holds back what
    -- its sender sent after it)
    local orphan = assert(leaver:send(payments.service, "ping", { n = 2 }, { await_reply = true }))
    local kept = assert(waiter:send(payments.service, "ping", { n = 1 }, { await_reply = true }))
    assert.equal(2, pbus:listen(function(m) assert(pbus:reply(m, "pong", { n = m.data.n })) end,
      { max = 2, timeout = 20 }))
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from msgbus.inbox where reply in ($1::uuid, $2::uuid)",
        kept, orphan) == 2
    end, 20, "the replies")
    -- the waiter's connection is killed; its bus reconnects and takes its waits over
    local old_pid = waiter.conn:backend_pid()
    assert.is_true(env.scalar(store, "select pg_terminate_backend($1, 10000)", old_pid))
    env.wait_until(function() return waiter:exec("select 1") end, 20, "the bus to reconnect")
    assert.are_not.equal(old_pid, waiter.conn:backend_pid())
    assert.equal(waiter.conn:backend_pid(), env.scalar(store, "select pid from msgbus.waits where id = $1::uuid", kept))
    -- the other bus goes away without calling wait_reply
    local leaver_pid = leaver.conn:backend_pid()
    leaver:close()
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from pg_stat_activity where pid = $1", leaver_pid) == 0
    end, 20, "the closed bus's session to end")
    -- a listener with no grace hands the orphan's reply over, and not the waiter's,
    -- also when it looks again (it forgets at most once a second)
    local lb = env.connect(store, { wait_grace = 0 })
    local got = {}
    local function handler(m) got[#got + 1] = m.reply end
    assert.equal(1, lb:listen(handler, { max = 1, timeout = 20 }))
    assert.same({ orphan }, got)
    assert.equal(0, lb:listen(handler, { timeout = 1.5 }))
    assert.same({ orphan }, got)
    lb:close()
    local r = assert(waiter:wait_reply(kept, 20))
    assert.equal(kept, r.reply)
    assert.equal(1, r.data.n)
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.waits"))
    waiter:close()
  end)

  it("a reply whose waiter died before wait_reply goes to a listener once the wait_grace has passed", function()
    -- a process sends with await_reply and is killed before it calls wait_reply
    local p = io.popen(("lua5.4 -e %s 2>&1"):format(("'%s'"):format(([[
      package.path, package.cpath = %q, %q
      local msgbus = require "msgbus"
      local bus = assert(msgbus.connect(%q))
      local id = assert(bus:send(%q, "ping", { n = 3 }, { await_reply = true }))
      assert(bus:wait_ack(id, 20))
      io.write(id, " ", bus.conn:backend_pid(), "\n")
      io.stdout:flush()
      os.execute("kill -9 " .. require("msgbus.cluster").self_pid())]]):format(package.path, package.cpath,
        store.conninfo, payments.service):gsub("'", "'\\''"))))
    local out = p:read("a")
    p:close()
    local id, pid = out:match("^(%x[%x-]+) (%d+)\n")
    assert(id, out)
    assert.equal(1, pbus:listen(function(m) assert(pbus:reply(m, "pong", { n = m.data.n })) end,
      { max = 1, timeout = 20 }))
    -- the same sender's next message waits behind the reply (per-sender order)
    assert.is_true(pbus:wait_ack(assert(pbus:send(store.service, "after", {})), 20))
    assert.equal(2, inbox_count(store))
    env.wait_until(function()
      return env.scalar(store, "select count(*)::int8 from pg_stat_activity where pid = $1", tonumber(pid)) == 0
    end, 20, "the dead process's session to end")
    -- within the grace (60 s by default) a listener leaves the reply alone, and notes
    -- that its waiter is gone
    local got = {}
    local function handler(m) got[#got + 1] = m end
    local lb = env.connect(store)
    assert.equal(0, lb:listen(handler, { timeout = 1.5 }))
    lb:close()
    assert.same({}, got)
    assert.equal(1, env.scalar(store,
      "select count(*)::int8 from msgbus.waits where id = $1::uuid and orphaned_at is not null", id))
    -- past it, the reply goes to the handler like any message, and then what followed
    lb = env.connect(store, { wait_grace = 0.5 })
    assert.equal(2, lb:listen(handler, { max = 2, timeout = 20 }))
    lb:close()
    assert.equal(id, got[1].reply)
    assert.equal("pong", got[1].type)
    assert.equal(3, got[1].data.n)
    assert.equal("after", got[2].type)
    assert.equal(0, env.scalar(store, "select count(*)::int8 from msgbus.waits"))
    assert.equal(0, inbox_count(store))
  end)

  it("refuses a wait_grace that is not a finite number of seconds >= 0", function()
    for _, bad in ipairs { -1, "5", 0 / 0, math.huge } do
      assert.has_error(function() msgbus.connect(store.conninfo, { wait_grace = bad }) end,
        "msgbus: bad argument #2 to 'connect' (opts.wait_grace must be a finite number of seconds >= 0)")
    end
  end)

  it("listen returns when the handler closes the bus, committing that message", function()
    local own = env.connect(payments)
    own:exec("create table if not exists closed_by_handler (msg uuid primary key)")
    local id = assert(sbus:send(payments.service, "stop", {}))
    local count = own:listen(function(m)
      assert(own:exec("insert into closed_by_handler values ($1)", m.id))
      own:close()
    end)
    assert.equal(1, count)
    assert.equal("msgbus.Bus (closed)", tostring(own))
    assert.equal(1, env.scalar(payments, "select count(*)::int8 from closed_by_handler where msg = $1", id))
    assert.equal(0, inbox_count(payments))
  end)

  it("listen returns after opts.timeout with nothing to do", function()
    local t0 = core.now()
    assert.equal(0, pbus:listen(function() end, { timeout = 0.2 }))
    assert.is_true(core.now() - t0 >= 0.2)
  end)

  it("ignores a duplicate arrival and acks it again", function()
    local id = assert(sbus:send(payments.service, "once", { v = 1 }))
    assert.is_true(sbus:wait_ack(id, 20))
    assert.equal(1, pbus:listen(function() end, { max = 1, timeout = 20 }))
    -- the same message put through the slot again, as after a lost slot
    env.exec(store, [[insert into msgbus.messages (id, sender, receiver, type, data)
                      values ($1, $2, $3, 'once', '{"v":1}')]], id, store.service, payments.service)
    assert.is_true(sbus:wait_ack(id, 20))
    assert.equal(0, pbus:listen(function() error("handled twice") end, { timeout = 0.3 }))
  end)

  it("returns a decode failure, not an error, for JSON deeper than the codec goes", function()
    local conn = assert(core.connect(store.conninfo))
    local ok, err, code = conn:exec("select $1::jsonb as j", ("["):rep(1001) .. ("]"):rep(1001))
    assert.is_nil(ok)
    assert.equal("decode", code)
    assert.equal("msgbus: JSON nesting deeper than 1000 at byte 1001", err)
    -- 1000 levels decode, and the connection goes on
    local rows = assert(conn:exec("select $1::jsonb as j", ("["):rep(1000) .. ("]"):rep(1000)))
    local depth, t = 0, rows[1].j
    while type(t) == "table" do depth, t = depth + 1, t[1] end
    assert.equal(1000, depth)
    conn:close()
  end)

  it("dead-letters what it cannot take instead of stopping delivery", function()
    -- a sender whose schema lets bad rows through: written here as a superuser with
    -- session_replication_role = replica, which msgbus's check lets pass
    local outbox = "to_" .. payments.service
    local c = assert(core.connect(store.conninfo))
    assert(c:exec("set session_replication_role = replica"))
    assert(c:exec(("insert into msgbus.%s (sender, receiver, type, data) values ($1, $2, 'bad', '[1,2]')")
      :format(outbox), store.service, payments.service))
    -- deeper than any receiver decodes: it would make every listen that claims it fail
    assert(c:exec(("insert into msgbus.%s (sender, receiver, type, data) values ($1, $2, 'deep', $3::jsonb)")
      :format(outbox), store.service, payments.service, '{"a":' .. ("["):rep(1200) .. ("]"):rep(1200) .. "}"))
    -- an ack that names no message: taking it would raise in the receiver's trigger
    assert(c:exec(("insert into msgbus.%s (sender, receiver, type) values ($1, $2, 'msgbus.ack')")
      :format(outbox), store.service, payments.service))
    -- a type in msgbus's own namespace, and one that only begins with its letters
    assert(c:exec(("insert into msgbus.%s (sender, receiver, type)"
      .. " values ($1, $2, 'msgbus.fake'), ($1, $2, 'msgbusy')"):format(outbox), store.service, payments.service))
    c:close()
    local id = assert(sbus:send(payments.service, "after_bad", {}))
    assert.is_true(sbus:wait_ack(id, 20))
    local got = {}
    pbus:listen(function(m) got[#got + 1] = m.type end, { max = 2, timeout = 20 })
    assert.same({ "msgbusy", "after_bad" }, got)
    assert.equal("invalid type",
      env.scalar(payments, "select reason from msgbus.dead_letters where type = 'msgbus.fake'"))
    assert.equal("data is not a JSON object",
      env.scalar(payments, "select reason from msgbus.dead_letters where type = 'bad'"))
    assert.equal("data nested deeper than 1000 levels",
      env.scalar(payments, "select reason from msgbus.dead_letters where type = 'deep'"))
    assert.equal(0, env.scalar(payments, [[select coalesce(sum(apply_error_count), 0)::int8
                                           from pg_stat_subscription_stats]]))
    -- the bad rows were acknowledged too, so they left the outbox (the ack without a
    -- message is never acknowledged: it is the one row left, and goes by hand)
    assert.equal(1, outbox_count(store, payments))
    env.exec(store, ("delete from msgbus.%s where type = 'msgbus.ack'"):format(outbox))
  end)
end)

describe("msgbus links", function()
  it("link two databases of one cluster", function()
    local x, y = env.linked({ "left", "right" }, { "a", "a" })
    assert.equal(env.scalar(x, "select system_identifier::text from pg_control_system()"),
                 env.scalar(y, "select system_identifier::text from pg_control_system()"))
    local xb, yb = env.connect(x), env.connect(y)
    local id = assert(xb:send(y.service, "hello", { n = 1 }))
    assert.is_true(xb:wait_ack(id, 20))
    local got
    yb:listen(function(m) got = m; assert(yb:reply(m, "hi", {})) end, { max = 1, timeout = 20 })
    assert.equal(id, got.id)
    assert.equal("hi", assert(xb:wait_reply(id, 20)).type)
    xb:close(); yb:close()
  end)

  it("link a third service to one that already has links, and link again harmlessly", function()
    local a, b = env.linked({ "hub", "spoke" }, { "a", "b" })
    local c = env.service("third", "c")
    assert(msgbus.setup.link(a, c))
    assert(msgbus.setup.link(a, b)) -- again: no error, still works
    local ab, bb, cb = env.connect(a), env.connect(b), env.connect(c)
    local to_b = assert(ab:send(b.service, "m", {}))
    local to_c = assert(ab:send(c.service, "m", {}))
    local from_c = assert(cb:send(a.service, "m", {}))
    assert.is_true(ab:wait_ack(to_b, 30))
    assert.is_true(ab:wait_ack(to_c, 30))
    assert.is_true(cb:wait_ack(from_c, 30))
    assert.equal(1, bb:listen(function() end, { max = 1, timeout = 20 }))
    assert.equal(1, cb:listen(function() end, { max = 1, timeout = 20 }))
    assert.equal(1, ab:listen(function() end, { max = 1, timeout = 20 }))
    ab:close(); bb:close(); cb:close()
  end)

  it("makes least-privilege replication roles", function()
    local a, b = env.linked({ "priv", "peer" }, { "a", "b" })
    local role = ("msgbus_%s_%s"):format(a.service, b.service)
    local r = env.exec(a, [[select rolsuper, rolreplication, rolcanlogin, rolcreaterole, rolcreatedb
                            from pg_roles where rolname = $1]], role)[1]
    assert.same({ rolsuper = false, rolreplication = true, rolcanlogin = true,
                  rolcreaterole = false, rolcreatedb = false }, r)
    assert.is_true(env.scalar(a, "select has_table_privilege($1, $2, 'select')", role, "msgbus.to_" .. b.service))
    assert.is_false(env.scalar(a, "select has_table_privilege($1, 'msgbus.inbox', 'select')", role))
    assert.is_false(env.scalar(a, "select has_table_privilege($1, 'msgbus.messages', 'insert')", role))
    -- no clear password in the publisher's catalog: a SCRAM verifier only
    assert.matches("^SCRAM%-SHA%-256%$", env.scalar(a, "select rolpassword from pg_authid where rolname = $1", role))
    -- with the peer's real credentials (from the subscriber's catalog): its own
    -- outbox is readable, another table is not
    local info = env.scalar(b, "select subconninfo from pg_subscription where subname = $1",
                            ("msgbus_%s_to_%s"):format(a.service, b.service))
    local conn = assert(core.connect((info:gsub("application_name='[^']*'", ""))))
    assert(conn:exec("select count(*) from msgbus.to_" .. b.service))
    local denied, err, code = conn:exec("select count(*) from msgbus.inbox")
    assert.is_nil(denied)
    assert.equal("42501", code)
    assert.matches("permission denied", err)
    conn:close()
  end)

  it("a peer's credentials cannot read another peer's outbox", function()
    local a, b, c = env.linked({ "pa", "pb", "pc" }, { "a", "b", "c" })
    -- b's replication role on a, with its password from b's subscription
    local info = env.scalar(b, "select subconninfo from pg_subscription where subname = $1",
                            ("msgbus_%s_to_%s"):format(a.service, b.service))
    local conn = assert(core.connect((info:gsub("application_name='[^']*'", ""))))
    assert(conn:exec("select count(*) from msgbus.to_" .. b.service))
    for _, t in ipairs { "msgbus.to_" .. c.service, "msgbus.messages", "msgbus.inbox", "msgbus.seen",
                         "msgbus.dead_letters", "msgbus.config" } do
      local denied, err, code = conn:exec("select count(*) from " .. t)
      assert.is_nil(denied, t .. " was readable")
      assert.equal("42501", code)
      assert.matches("permission denied", err)
    end
    local denied, _, code = conn:exec("insert into msgbus.messages (receiver, type) values ($1, 'x')", c.service)
    assert.is_nil(denied)
    assert.equal("42501", code)
    conn:close()
  end)

  it("keeps subscription passwords in passfiles instead of the catalog when asked", function()
    local a, b = env.service("pfa", "a"), env.service("pfb", "b")
    a.passfile_dir, b.passfile_dir = a.cluster.dir, b.cluster.dir
    local lines = {}
    assert(msgbus.setup.link(a, b, { log = function(l) lines[#lines + 1] = l end }))
    local function sub_of(pub, sub)
      return ("msgbus_%s_to_%s"):format(pub.service, sub.service)
    end
    for _, d in ipairs { { a, b }, { b, a } } do
      local pub, sub = d[1], d[2]
      local info = env.scalar(sub, "select subconninfo from pg_subscription where subname = $1", sub_of(pub, sub))
      assert.is_nil(info:find("password", 1, true))
      local path = ("%s/%s.pgpass"):format(sub.cluster.dir, sub_of(pub, sub))
      assert.matches("passfile='" .. path .. "'", info, 1, true)
      -- written by the server's user, readable by it alone, as libpq requires
      local p = io.popen("stat -c '%a %U' " .. path)
      assert.equal("600 postgres", p:read("l"))
      p:close()
      local f = assert(io.open(path))
      local entry = f:read("l")
      f:close()
      assert.matches(("^%%*:%%*:%%*:msgbus_%s_%s:%%x+$"):format(pub.service, sub.service), entry)
      assert.matches(path .. " (not in the catalog)", table.concat(lines, "\n"), 1, true)
    end
    -- both directions work on those passwords
    local ab, bb = env.connect(a), env.connect(b)
    assert.is_true(ab:wait_ack(assert(ab:send(b.service, "hi", {})), 30))
    assert.is_true(bb:wait_ack(assert(bb:send(a.service, "hi", {})), 30))
    ab:close(); bb:close()
    -- unlink blanks the files
    assert(msgbus.setup.unlink(a, b, { force = true }))
    local f = assert(io.open(("%s/%s.pgpass"):format(b.cluster.dir, sub_of(a, b))))
    assert.equal("", (f:read("a"):gsub("%s", "")))
    f:close()
    -- only what setup writes is accepted
    local ok, _, code = msgbus.setup.link(a, b) -- (a plain relink works)
    assert.is_true(ok, code)
    local bad = assert(core.connect(a.conninfo))
    local r, err, ecode = bad:exec("select msgbus.write_passfile('/tmp/x.conf', '')")
    assert.is_nil(r)
    assert.equal("22023", ecode)
    assert.matches("invalid passfile path", err)
    r, _, ecode = bad:exec("select msgbus.write_passfile($1, 'hello')", a.cluster.dir .. "/msgbus_x_to_y.pgpass")
    assert.is_nil(r)
    assert.equal("22023", ecode)
    bad:close()
  end)

  it("unlink refuses while messages are unacked, then removes everything", function()
    local a, b = env.linked({ "ul", "ur" }, { "a", "b" })
    local sub = ("msgbus_%s_to_%s"):format(a.service, b.service)
    env.exec(b, "alter subscription " .. sub .. " disable")
    local ab = env.connect(a)
    assert(ab:send(b.service, "pending", {}))
    local ok, err, code = msgbus.setup.unlink(a, b)
    assert.is_nil(ok)
    assert.equal("MB005", code)
    assert.matches("not acknowledged", err)
    assert.is_true(msgbus.setup.unlink(a, b, { force = true }))
    assert.equal(0, env.scalar(a, "select count(*)::int8 from pg_replication_slots where slot_name like $1",
                               "msgbus_" .. a.service .. "%"))
    assert.equal(0, env.scalar(b, "select count(*)::int8 from pg_subscription where subname like $1",
                               "msgbus_" .. a.service .. "%"))
    assert.equal(0, env.scalar(a, "select count(*)::int8 from pg_roles where rolname = $1",
                               ("msgbus_%s_%s"):format(a.service, b.service)))
    local sent, serr, scode = ab:send(b.service, "after", {})
    assert.is_nil(sent)
    assert.equal("MB001", scode)
    assert.matches(b.service, serr)
    ab:close()
  end)
end)

describe("msgbus.setup.install", function()
  it("is harmless when run again or by two processes at once", function()
    local c = env.cluster("a")
    local db = "inst" .. core.random_hex(3)
    assert(c:createdb(db))
    local info = c:conninfo(db)
    local script = ([[package.path = %q; package.cpath = %q
      local ok, err = require("msgbus").setup.install(%q, %q)
      io.write(ok and "ok" or tostring(err))]]):format(package.path, package.cpath, info, db)
    local procs = {}
    for i = 1, 3 do procs[i] = io.popen("lua5.4 -e " .. ("'%s'"):format(script:gsub("'", "'\\''")), "r") end
    for i = 1, 3 do
      assert.equal("ok", procs[i]:read("a"))
      procs[i]:close()
    end
    assert(msgbus.setup.install(info, db))
    local svc = { conninfo = info }
    -- each migration recorded once, every file of sql/ applied
    local files = 0
    for name in io.popen("ls sql"):lines() do
      if name:match("^%d+_[%w_]+%.sql$") then files = files + 1 end
    end
    assert.is_true(files >= 3)
    assert.equal(files, env.scalar(svc, "select count(*)::int8 from msgbus.migrations"))
    assert.equal(db, env.scalar(svc, "select msgbus.service()"))
    -- a database is one service only
    local ok, err, code = msgbus.setup.install(info, "other_name")
    assert.is_nil(ok)
    assert.equal("MB003", code)
    assert.matches(db, err)
  end)

  it("upgrades an install of version 8: its waits become holderless, the app role gets the new grants", function()
    local c = env.cluster("a")
    local db = "upg" .. core.random_hex(3)
    assert(c:createdb(db))
    local info = c:conninfo(db)
    local svc = { conninfo = info }
    -- version 8 as setup.install left it: migrations 001 to 008 in the ledger
    local conn = assert(core.connect(info))
    assert(conn:script([[create schema msgbus;
      create table msgbus.migrations (version integer primary key, name text not null,
                                      applied_at timestamptz not null default now())]]))
    local names, latest = {}, 0
    for name in io.popen("ls sql"):lines() do
      local v, base = name:match("^(%d+)_([%w_]+)%.sql$")
      if v then latest = math.max(latest, tonumber(v)) end
      if v and tonumber(v) <= 8 then names[tonumber(v)] = v .. "_" .. base end
    end
    assert.equal(8, #names)
    for v, name in ipairs(names) do
      assert(conn:script(assert(io.open("sql/" .. name .. ".sql")):read("a")))
      assert(conn:exec("insert into msgbus.migrations (version, name) values ($1, $2)", v, name))
    end
    assert(conn:exec("select msgbus.configure($1)", db))
    local old = assert(conn:exec("insert into msgbus.waits (id) values (gen_random_uuid()) returning id::text"))[1].id
    local role = ("msgbus_%s_app"):format(db)
    assert.is_false(assert(conn:exec("select has_column_privilege($1, 'msgbus.waits', 'id', 'select') as p", role))[1].p)
    conn:close()
    -- this version's bus does not work on it, and says what to do
    local bus, err, code = msgbus.connect(info)
    assert.is_nil(bus)
    -- a column or a function it uses is missing, whichever it prepares first
    assert.is_true(code == "42703" or code == "42883", code)
    assert.matches("older than this msgbus (run msgbus.setup.install", err, 1, true)

    assert(msgbus.setup.install(info, db))
    assert.equal(latest, env.scalar(svc, "select max(version) from msgbus.migrations"))
    -- the wait from before has no holder (nor one made up from the migrating session)
    assert.same({ { id = old } }, env.exec(svc, "select id::text from msgbus.waits where pid is null"))
    assert.equal(0, env.scalar(svc, "select msgbus.forget_orphaned_waits('0')"))
    -- the existing app role may adopt, forget and read what it needs, not more
    for _, check in ipairs {
      { "has_function_privilege($1, 'msgbus.forget_orphaned_waits(interval)', 'execute')", true },
      { "has_column_privilege($1, 'msgbus.waits', 'pid', 'update')", true },
      { "has_column_privilege($1, 'msgbus.waits', 'orphaned_at', 'update')", true },
      { "has_column_privilege($1, 'msgbus.waits', 'id', 'select')", true },
      { "has_column_privilege($1, 'msgbus.waits', 'since', 'update')", false },
      { "has_function_privilege($1, 'msgbus.claim_batch(integer)', 'execute')", true },
      { "has_function_privilege($1, 'msgbus.send_many(text, text, jsonb, float8, float8)', 'execute')", true },
    } do
      assert.equal(check[2], env.scalar(svc, "select " .. check[1], role), check[1])
    end
    -- new waits are held by the session that registers them
    bus = env.connect(svc)
    local rows = assert(bus:exec("insert into msgbus.waits (id) values (gen_random_uuid()) returning pid"))
    assert.equal(bus.conn:backend_pid(), rows[1].pid)
    bus:close()
    -- a holderless wait is forgotten after the dedup retention
    env.exec(svc, "update msgbus.waits set since = now() - interval '8 days' where id = $1::uuid", old)
    assert.equal(1, env.scalar(svc, "select msgbus.forget_orphaned_waits()"))
    assert.equal(0, env.scalar(svc, "select count(*)::int8 from msgbus.waits where pid is null"))
  end)
end)
