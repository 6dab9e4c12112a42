-- Bad input gets a clear error and writes nothing.
local msgbus = require "msgbus"
local env = require "helpers.env"

describe("bad input", function()
  local a, b, bus

  setup(function()
    a, b = env.linked({ "inp", "inq" }, { "a", "b" })
    bus = env.connect(a)
  end)

  teardown(function() bus:close() end)

  local long = ("x"):rep(64)
  local deep = {}
  do local t = deep; for _ = 1, 200 do t.x = {}; t = t.x end end
  local cyclic = {}; cyclic.self = cyclic

  -- { description, function(bus, peer) that must raise, pattern of the message }
  local raising = {
    { "data is nil", function(p) bus:send(p, "t", nil) end, "data must be a table" },
    { "data is a string", function(p) bus:send(p, "t", "{}") end, "data must be a table" },
    { "data is a number", function(p) bus:send(p, "t", 42) end, "data must be a table" },
    { "data is an array", function(p) bus:send(p, "t", { 1, 2 }) end, "not an array" },
    { "data marked as array", function(p) bus:send(p, "t", setmetatable({}, msgbus.array_mt)) end, "not an array" },
    { "data with a function", function(p) bus:send(p, "t", { f = print }) end, "function" },
    { "data with NaN", function(p) bus:send(p, "t", { x = 0 / 0 }) end, "NaN" },
    { "data with infinity", function(p) bus:send(p, "t", { x = math.huge }) end, "infinity" },
    { "data with invalid UTF-8", function(p) bus:send(p, "t", { x = "\xff\xfe" }) end, "UTF%-8" },
    { "data with an overlong UTF-8", function(p) bus:send(p, "t", { x = "\xc0\xaf" }) end, "UTF%-8" },
    { "data with a NUL byte", function(p) bus:send(p, "t", { x = "a\0b" }) end, "NUL" },
    { "data with mixed keys", function(p) bus:send(p, "t", { 1, x = 2 }) end, "keys" },
    { "data with sparse keys", function(p) bus:send(p, "t", { list = { [1] = 1, [5] = 5 } }) end, "sparse" },
    { "data nested too deep", function(p) bus:send(p, "t", deep) end, "nesting" },
    { "data with a cycle", function(p) bus:send(p, "t", cyclic) end, "nesting" },
    { "receiver not a string", function() bus:send(42, "t", {}) end, "service name expected" },
    { "receiver empty", function() bus:send("", "t", {}) end, "invalid service name" },
    { "receiver too long", function() bus:send(long, "t", {}) end, "invalid service name" },
    { "receiver with SQL", function() bus:send("x'; drop table y; --", "t", {}) end, "invalid service name" },
    { "receiver with capitals", function() bus:send("Payments", "t", {}) end, "invalid service name" },
    { "type not a string", function(p) bus:send(p, 1, {}) end, "message type expected" },
    { "type empty", function(p) bus:send(p, "", {}) end, "invalid message type" },
    { "type too long", function(p) bus:send(p, long, {}) end, "invalid message type" },
    { "type with SQL", function(p) bus:send(p, "a'); delete from x; --", {}) end, "invalid message type" },
    { "type reserved", function(p) bus:send(p, "msgbus.ack", {}) end, "reserved" },
    { "options not a table", function(p) bus:send(p, "t", {}, "x") end, "options table" },
    { "send_many without a list", function(p) bus:send_many(p, "t", nil) end, "non%-empty array" },
    { "send_many with an empty list", function(p) bus:send_many(p, "t", {}) end, "non%-empty array" },
    { "send_many with a bad element", function(p) bus:send_many(p, "t", { {}, { x = 0 / 0 } }) end, "element 2: .*NaN" },
    { "send_many with an array element", function(p) bus:send_many(p, "t", { { 1 } }) end, "element 1: .*not an array" },
    { "send_many with a bad type", function(p) bus:send_many(p, "msgbus.x", { {} }) end, "reserved" },
    { "reply not an id", function(p) bus:send(p, "t", {}, { reply = "nope" }) end, "message id expected" },
    { "wait_ack with a bad id", function() bus:wait_ack("1; select 1", 1) end, "message id expected" },
    { "wait_ack negative timeout", function() bus:wait_ack("00000000-0000-0000-0000-000000000000", -1) end, "timeout" },
    { "wait_ack NaN timeout", function() bus:wait_ack("00000000-0000-0000-0000-000000000000", 0 / 0) end, "timeout" },
    { "wait_reply negative timeout", function() bus:wait_reply("00000000-0000-0000-0000-000000000000", -0.5) end, "timeout" },
    { "listen without a function", function() bus:listen("handler") end, "function expected" },
    { "listen negative timeout", function() bus:listen(function() end, { timeout = -1 }) end, "timeout" },
    { "listen max zero", function() bus:listen(function() end, { max = 0 }) end, "opts.max" },
    { "reply to a non-message", function() bus:reply("msg", "t", {}) end, "message table expected" },
    { "reply to a message without sender", function() bus:reply({ id = "00000000-0000-0000-0000-000000000000" }, "t", {}) end,
      "service name expected" },
    { "exec without SQL", function() bus:exec(nil) end, "SQL string expected" },
    { "exec with a function parameter", function() bus:exec("select $1::text", print) end, "function" },
    { "exec with a NUL byte in a parameter", function(p)
      bus:exec("insert into msgbus.messages (receiver, type) values ($1, $2)", p, "t\0x")
    end, "parameter %$2 contains a NUL byte" },
    { "transaction without a function", function() bus:transaction("begin") end, "function expected" },
    { "method called with a dot", function() msgbus.Bus.send({}, "x", "t", {}) end, "msgbus.Bus expected" },
    { "connect without conninfo", function() msgbus.connect(nil) end, "conninfo string expected" },
    { "connect with a bad service option", function() msgbus.connect(a.conninfo, { service = "Bad Name" }) end,
      "invalid service name" },
    { "install with a bad service name", function() msgbus.setup.install(a.conninfo, "1abc") end, "invalid service name" },
    { "link with a missing side", function() msgbus.setup.link(a, nil) end, "table" },
  }

  for _, case in ipairs(raising) do
    it("raises for " .. case[1] .. " and writes nothing", function()
      local before = env.scalar(a, "select count(*)::int8 from msgbus.messages")
      local ok, err = pcall(case[2], b.service)
      assert.is_false(ok)
      assert.matches("^[%w_/.-]*:?%d*:? ?msgbus: ", tostring(err))
      assert.matches(case[3], tostring(err))
      assert.equal(before, env.scalar(a, "select count(*)::int8 from msgbus.messages"))
    end)
  end

  it("returns an error for data over the size limit, writing nothing", function()
    local small = env.connect(a, { max_data_bytes = 1000 })
    local ok, err, code = small:send(b.service, "big", { blob = ("y"):rep(2000) })
    assert.is_nil(ok)
    assert.equal("too_large", code)
    assert.matches("limit", err)
    assert.equal(0, env.scalar(a, "select count(*)::int8 from msgbus.messages"))
    small:close()
  end)

  it("returns an error for a send to itself", function()
    local ok, err, code = bus:send(a.service, "self", {})
    assert.is_nil(ok)
    assert.equal("MB002", code)
    assert.matches("itself", err)
  end)

  it("refuses a plain SQL insert that breaks the rules at the sender", function()
    for _, sql in ipairs {
      "insert into msgbus.messages (receiver, type, data) values ($1, 't', '[1]')",
      "insert into msgbus.messages (receiver, type, data) values ($1, '', '{}')",
      "insert into msgbus.messages (receiver, type, data) values ($1, 'msgbus.ack', '{}')",
      "insert into msgbus.messages (receiver, type, data) values ($1, 't', null)",
      "insert into msgbus.messages (receiver, type, data, sender) values ($1, 't', '{}', 'someone_else')",
    } do
      local ok, err = bus:exec(sql, b.service)
      assert.is_nil(ok, sql)
      assert.matches("^msgbus: ", err)
    end
    local ok, err, code = bus:exec("insert into msgbus.messages (receiver, type) values ('ghost', 't')")
    assert.is_nil(ok)
    assert.equal("MB001", code)
    assert.matches("unknown receiver \"ghost\"", err)
    assert.equal(0, env.scalar(a, "select count(*)::int8 from msgbus.messages"))
  end)

  it("checks a type in SQL by bus:send's rule, a message's and a pack's (version 17's test)", function()
    -- the rule: 1 to 63 characters, an ASCII letter first, then letters, digits or
    -- _ . : -, and not msgbus.* (a type that is not ASCII fails the pattern, so
    -- counting bytes here and characters in SQL agrees)
    local function allowed(t)
      return #t <= 63 and t:match("^[A-Za-z][A-Za-z0-9_.:%-]*$") ~= nil and t:sub(1, 7) ~= "msgbus."
    end
    local cases = { "a", "Z", "a-b.c:d_e9", "", "1a", "_a", ".a", "a b", "msgbus.x", "msgbus.", "msgbus",
      "msgbusx", "Msgbus.x", "msgbus:x", "xmsgbus.x", "é", "aé", "a\n", "a'", "a$", "a/b", "a" .. ("é"):rep(31) }
    for _, n in ipairs { 62, 63, 64, 65 } do
      cases[#cases + 1] = "t" .. ("x"):rep(n - 1)
      cases[#cases + 1] = "msgbus." .. ("x"):rep(n - 7)
    end
    -- and strings made at random from pieces of types, every other one after a letter
    -- (a fixed seed: the same ones each run)
    local pieces = { "a", "Z", "k", "0", "9", "_", ".", ":", "-", "msgbus.", "xxxxxxxxxx", " ", "é", "/" }
    local rng = 17
    local function random(n) rng = (rng * 1103515245 + 12345) % 2147483648; return rng % n + 1 end
    for i = 1, 300 do
      local parts = { i % 2 == 0 and "t" or nil }
      for _ = 1, random(12) - 1 do parts[#parts + 1] = pieces[random(#pieces)] end
      cases[#cases + 1] = table.concat(parts)
    end
    local pack_id = "00000000-0000-4000-8000-000000000001"
    local taken = 0
    for _, t in ipairs(cases) do
      local ok, err = bus:exec("select msgbus.valid_message($1, null, '{}') as v", t)
      assert.equal(allowed(t), ok ~= nil, ("type %q: %s"):format(t, tostring(err)))
      if not ok then assert.matches("invalid message type", err) end
      local pack = msgbus.encode({ type = t, ids = { pack_id }, data = { {} } })
      ok, err = bus:exec("select msgbus.valid_message('msgbus.pack', null, $1::jsonb) as v", pack)
      assert.equal(allowed(t), ok ~= nil, ("pack type %q: %s"):format(t, tostring(err)))
      if not ok then assert.matches("invalid message type .* in a pack", err) end
      if allowed(t) then taken = taken + 1 end
    end
    -- the corpus holds both kinds
    assert.is_true(taken >= 30 and #cases - taken >= 30, ("%d of %d allowed"):format(taken, #cases))
  end)

  it("raises for any use of a closed bus", function()
    local c = env.connect(a)
    c:close()
    c:close() -- idempotent
    assert.equal("msgbus.Bus (closed)", tostring(c))
    for _, f in ipairs {
      function() c:send(b.service, "t", {}) end,
      function() c:wait_ack("00000000-0000-0000-0000-000000000000", 0) end,
      function() c:listen(function() end, { timeout = 0 }) end,
      function() c:exec("select 1") end,
      function() c:transaction(function() end) end,
    } do
      local ok, err = pcall(f)
      assert.is_false(ok)
      assert.matches("bus is closed", err)
    end
  end)

  it("returns a clear error for a database without msgbus", function()
    local c = env.cluster("a")
    local db = "plain" .. require("msgbus.core").random_hex(2)
    assert(c:createdb(db))
    local ok, err, code = msgbus.connect(c:conninfo(db))
    assert.is_nil(ok)
    assert.matches("not installed", err)
    assert.is_string(code)
  end)
end)
