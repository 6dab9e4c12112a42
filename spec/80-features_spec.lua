-- Delayed and expiring messages, broadcast, and driving a bus from an event loop.
local core = require "msgbus.core"
local env = require "helpers.env"

describe("send options", function()
  local a, b, c, ab, bb, cb

  setup(function()
    a, b, c = env.linked({ "fa", "fb", "fc" }, { "a", "b", "c" })
    ab, bb, cb = env.connect(a), env.connect(b), env.connect(c)
  end)

  teardown(function() ab:close(); bb:close(); cb:close() end)

  it("delay: not handed to a handler before the delay", function()
    local t0 = core.now()
    local id = assert(ab:send(b.service, "later", {}, { delay = 1.0 }))
    assert.is_true(ab:wait_ack(id, 20))
    local due = bb:timeout()
    assert.is_number(due)
    assert.is_true(due >= 0 and due <= 1.0)
    local at
    assert.equal(1, bb:listen(function() at = core.now() end, { max = 1, timeout = 20 }))
    assert.is_true(at - t0 >= 0.99, ("handled after %.3fs"):format(at - t0))
  end)

  it("ttl: a message not handled in time goes to the dead letters as expired", function()
    local id = assert(ab:send(b.service, "perishable", { v = 1 }, { ttl = 0.2 }))
    assert.is_true(ab:wait_ack(id, 20))
    env.wait_until(function()
      return env.scalar(b, "select now() > expires_at from msgbus.inbox where id = $1", id)
    end, 20, "the ttl to pass")
    assert.equal(0, bb:listen(function() error("an expired message was handled") end, { timeout = 0 }))
    assert.equal("expired", env.scalar(b, "select reason from msgbus.dead_letters where id = $1", id))
    -- a message within its ttl is handled as usual
    id = assert(ab:send(b.service, "fresh", {}, { ttl = 60 }))
    local got
    bb:listen(function(m) got = m.id end, { max = 1, timeout = 20 })
    assert.equal(id, got)
  end)

  it("refuses bad delay and ttl values", function()
    for _, o in ipairs { { delay = -1 }, { delay = 0 / 0 }, { ttl = 0 }, { ttl = -5 }, { ttl = "1" }, { delay = math.huge } } do
      local ok, err = pcall(ab.send, ab, b.service, "t", {}, o)
      assert.is_false(ok)
      assert.matches("seconds", err)
    end
  end)

  it("broadcast: one message per receiver in one transaction", function()
    local ids = assert(ab:send({ b.service, c.service }, "news", { n = 7 }))
    assert.equal(2, #ids)
    assert.are_not.equal(ids[1], ids[2])
    local gb, gc
    bb:listen(function(m) gb = m end, { max = 1, timeout = 20 })
    cb:listen(function(m) gc = m end, { max = 1, timeout = 20 })
    assert.equal(ids[1], gb.id)
    assert.equal(ids[2], gc.id)
    assert.equal(7, gc.data.n)
    for _, id in ipairs(ids) do assert.is_true(ab:wait_ack(id, 20)) end
    -- one unknown receiver: nothing is sent to anyone
    local ok, err, code = ab:send({ b.service, "nobody" }, "news", {})
    assert.is_nil(ok)
    assert.equal("MB001", code)
    assert.matches("nobody", err)
    assert.equal(0, env.scalar(a, "select count(*)::int8 from msgbus.messages where receiver <> msgbus.service()"))
  end)
end)

describe("bus:status", function()
  it("reports a healthy link, then the problem when the peer's subscription stops", function()
    local a, b = env.linked({ "sa", "sb" }, { "a", "b" })
    local ab = env.connect(a)
    local st = env.wait_until(function()
      local s = assert(ab:status())
      return s.healthy and s
    end, 30, "a healthy status")
    assert.equal(a.service, st.service)
    assert.equal(1, #st.peers)
    assert.equal(b.service, st.peers[1].peer)
    assert.equal(0, st.inbox)
    env.exec(a, ("alter subscription msgbus_%s_to_%s disable"):format(b.service, a.service))
    st = assert(ab:status())
    assert.is_false(st.healthy)
    assert.matches("disabled", st.problems[1])
    ab:close()
  end)
end)

describe("event loops", function()
  it("step hands over what is there and returns at once", function()
    local a, b = env.linked({ "ea", "eb" }, { "a", "b" })
    local ab, bb = env.connect(a), env.connect(b)
    assert.equal("integer", math.type(bb:pollfd()))
    assert.equal("r", bb:events())
    assert.is_nil(bb:timeout())
    local t0 = core.now()
    assert.equal(0, bb:step(function() end))
    assert.is_true(core.now() - t0 < 1)
    for i = 1, 3 do assert(ab:send(b.service, "s", { i = i })) end
    env.wait_until(function() return env.scalar(b, "select count(*)::int8 from msgbus.inbox") == 3 end, 20, "arrivals")
    local got = {}
    assert.equal(3, bb:step(function(m) got[#got + 1] = m.data.i end))
    assert.same({ 1, 2, 3 }, got)
    ab:close(); bb:close()
  end)

  for _, example in ipairs { "cqueues", "luv" } do
    it("runs the " .. example .. " example", function()
      -- its clusters go under the spec run's folder, which is cleaned up whatever happens
      local p = io.popen(("TMPDIR=%q EXAMPLE_MESSAGES=40 lua5.4 -e 'package.path=%q; package.cpath=%q' examples/%s.lua 2>&1")
        :format(os.getenv("MSGBUS_TEST_DIR") or "/tmp", package.path, package.cpath, example))
      local out = p:read("a")
      local ok = p:close()
      assert(ok, out)
      local handled, ticks = out:match("handled (%d+) messages while the ticker ran (%d+) times")
      assert.equal("40", handled, out)
      assert.is_true(tonumber(ticks) > 0)
    end)
  end
end)
