-- Several listening processes, and a large batch: per-message work stays an index
-- lookup and nothing is left behind.
local core = require "msgbus.core"
local msgbus = require "msgbus"
local env = require "helpers.env"

-- Start a child Lua process running `code` with msgbus on its paths.
local function spawn(code)
  local script = ("package.path = %q; package.cpath = %q\n%s"):format(package.path, package.cpath, code)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  return io.popen("lua5.4 " .. path .. " 2>&1; rm -f " .. path, "r")
end

local function scans(svc)
  local t = {}
  for _, r in ipairs(env.exec(svc, [[select relname, seq_scan, coalesce(idx_scan, 0) as idx_scan
                                     from pg_stat_user_tables where schemaname = 'msgbus']])) do
    t[r.relname] = r
  end
  return t
end

describe("listen", function()
  -- batch sizes of the three workers: one message a transaction (claim), and a mix
  -- of that with batches (claim_batch) on the same inbox; with packs, every other 50
  -- of a sender's messages go in one send_many (a pack that waits whole, which the
  -- worker taking 1000 gets from its row and the others unpack)
  for _, batches in ipairs { { 1, 1, 1 }, { 1, 10, 64 }, { 1, 10, 1000, packs = true } } do
    it(("shares an inbox between processes: each message once, each sender in order (batch %s%s)")
      :format(table.concat(batches, ", "), batches.packs and ", packs" or ""), function()
      local x, y, hub = env.linked({ "px", "py", "phub" }, { "a", "b", "c" })
      local hb = env.connect(hub)
      hb:exec("create table handled (msg uuid primary key, sender text, i int, worker int, seq bigserial)")
      local n = 200
      for _, s in ipairs { x, y } do
        if batches.packs then
          env.wait_until(function()
            return env.scalar(s, "select packs from msgbus.peers where service = $1", hub.service)
          end, 30, "the hub's hello")
        end
        local b = env.connect(s)
        assert(b:transaction(function()
          for first = 1, n, 50 do
            if batches.packs and first % 100 == 1 then
              local list = {}
              for i = first, first + 49 do list[#list + 1] = { i = i } end
              assert(b:send_many(hub.service, "work", list))
            else
              for i = first, first + 49 do assert(b:send(hub.service, "work", { i = i })) end
            end
          end
        end))
        b:close()
      end
      env.wait_until(function()
        return env.scalar(hub, "select sum(msgbus.message_count(type, data))::int8 from msgbus.inbox") == 2 * n
      end, 60, "the messages to arrive")
      if batches.packs then
        assert.equal(4, env.scalar(hub, "select count(*)::int8 from msgbus.inbox where type = 'msgbus.pack'"))
      end
      local workers = {}
      for w = 1, 3 do
        workers[w] = spawn(([[
          local msgbus = require "msgbus"
          local bus = assert(msgbus.connect(%q))
          local count = assert(bus:listen(function(m)
            assert(bus:exec("insert into handled (msg, sender, i, worker) values ($1, $2, $3, $4)",
                            m.id, m.sender, m.data.i, %d))
          end, { timeout = 1, batch = %d }))
          io.write("handled ", count)
        ]]):format(hub.conninfo, w, batches[w]))
      end
      local total = 0
      for w = 1, 3 do
        local out = workers[w]:read("a")
        workers[w]:close()
        total = total + assert(tonumber(out:match("handled (%d+)")), out)
      end
      assert.equal(2 * n, total)
      assert.equal(2 * n, env.scalar(hub, "select count(*)::int8 from handled"))
      assert.equal(0, env.scalar(hub, "select count(*)::int8 from msgbus.inbox"))
      assert.equal(0, env.scalar(hub, "select count(*)::int8 from msgbus.dead_letters"))
      -- in commit order, each sender's messages were handled 1, 2, 3, ...
      for _, s in ipairs { x, y } do
        local rows = env.exec(hub, "select i from handled where sender = $1 order by seq", s.service)
        assert.equal(n, #rows)
        for i = 1, n do assert.equal(i, rows[i].i) end
      end
      hb:close()
    end)
  end

  it("claim_batch takes other senders' messages behind a sender whose older ones another consumer holds", function()
    local x, y, hub = env.linked({ "kx", "ky", "khub" }, { "a", "b", "c" })
    -- x's five arrive before y's three
    for _, s in ipairs { { x, 5 }, { y, 3 } } do
      local b = env.connect(s[1])
      assert(b:transaction(function()
        for i = 1, s[2] do assert(b:send(hub.service, "work", { i = i })) end
      end))
      b:close()
      local want = s[1] == x and 5 or 8
      env.wait_until(function()
        return env.scalar(hub, "select count(*)::int8 from msgbus.inbox") == want
      end, 60, "the messages to arrive")
    end
    local c1, c2, c3 = assert(core.connect(hub.conninfo)), assert(core.connect(hub.conninfo)),
                       assert(core.connect(hub.conninfo))
    local function claim(c, n)
      local rows = assert(c:script(([[begin; select id::text as id, sender || (data->>'i') as m
                                      from msgbus.claim_batch(%d)]]):format(n)))
      local ms, ids = {}, {}
      for k, r in ipairs(rows) do ms[k], ids[k] = r.m, r.id end
      return ms, "{" .. table.concat(ids, ",") .. "}"
    end
    local m1, ids1 = claim(c1, 2)
    assert.same({ x.service .. "1", x.service .. "2" }, m1)
    -- the first walk of c2 finds only x's, which c1 holds or which come after those:
    -- it walks again without x and takes y's
    local m2, ids2 = claim(c2, 3)
    assert.same({ y.service .. "1", y.service .. "2", y.service .. "3" }, m2)
    -- a third consumer gets nothing: x's 3 to 5 are behind x's 1 and 2
    assert.same({}, (claim(c3, 10)))
    assert(c3:exec("rollback"))
    assert(c1:script(("select msgbus.done_many('%s'); commit"):format(ids1)))
    assert(c2:script(("select msgbus.done_many('%s'); commit"):format(ids2)))
    local m3, ids3 = claim(c3, 10)
    assert.same({ x.service .. "3", x.service .. "4", x.service .. "5" }, m3)
    assert(c3:script(("select msgbus.done_many('%s'); commit"):format(ids3)))
    assert.equal(0, env.scalar(hub, "select count(*)::int8 from msgbus.inbox"))
    c1:close(); c2:close(); c3:close()
  end)

  it("vacuums its inbox after a burst, not each time a trickle leaves it empty", function()
    local s, r = env.linked({ "vs", "vr" }, { "a", "b" })
    local sb, rb = env.connect(s), env.connect(r)
    local function vacuums()
      return env.scalar(r, [[select vacuum_count from pg_stat_user_tables
                              where schemaname = 'msgbus' and relname = $1]], "to_" .. r.service)
    end
    local v0 = vacuums()
    -- one message at a time: the inbox runs empty after each
    for i = 1, 5 do
      assert.is_true(sb:wait_ack(assert(sb:send(r.service, "trickle", { i = i })), 30))
      assert.equal(1, rb:listen(function() end, { timeout = 0.2 }))
    end
    assert.equal(v0, vacuums())
    -- a burst of 100 (105 handled since the last vacuum): one vacuum when it runs empty
    local last
    assert(sb:transaction(function()
      for i = 1, 100 do last = assert(sb:send(r.service, "burst", { i = i })) end
    end))
    assert.is_true(sb:wait_ack(last, 60))
    assert.equal(100, rb:listen(function() end, { timeout = 0.2 }))
    assert.equal(v0 + 1, vacuums())
    sb:close()
    rb:close()
  end)

  it("vacuums less often when a vacuum takes long next to the messages it follows", function()
    local s, r = env.linked({ "ws", "wr" }, { "a", "b" })
    local sb = env.connect(s)
    -- a listener whose vacuums sleep (cost-based delay): each takes tens of ms, while
    -- a message of a batch takes well under one
    local rb = assert(msgbus.connect(r.conninfo .. " options='-c vacuum_cost_delay=2 -c vacuum_cost_limit=10'"))
    local function vacuums()
      return env.scalar(r, [[select vacuum_count from pg_stat_user_tables
                              where schemaname = 'msgbus' and relname = $1]], "to_" .. r.service)
    end
    local v0 = vacuums()
    local list = {}
    for i = 1, 2000 do list[i] = { i = i } end
    assert(sb:transaction(function() assert(sb:send_many(r.service, "bulk", list)) end))
    env.wait_until(function()
      return env.scalar(r, "select count(*)::int8 from msgbus.inbox") == 2000
    end, 60, "the messages to arrive")
    -- every 500 would be 4 vacuums; after the first, the next is due only after many
    -- more than 2,000 messages, and the last comes when the inbox runs empty
    assert.equal(2000, rb:listen(function() end, { batch = 50, timeout = 0.2 }))
    assert.equal(v0 + 2, vacuums())
    sb:close()
    rb:close()
  end)

  it("moves a batch of 20,000 with index lookups only, leaving nothing behind", function()
    local s, r = env.linked({ "bs", "br" }, { "a", "b" })
    local sb, rb = env.connect(s), env.connect(r)
    local N = 20000
    local s0, r0 = scans(s), scans(r)
    local t0 = core.now()
    assert(sb:transaction(function()
      for i = 1, N do assert(sb:send(r.service, "batch", { i = i })) end
    end))
    local t1 = core.now()
    env.wait_until(function()
      return env.scalar(s, "select count(*)::int8 from msgbus.messages") == 0
    end, 120, "all acks")
    local t2 = core.now()
    local got = 0
    assert.equal(N, rb:listen(function(m)
      got = got + 1
      assert(m.data.i == got, "out of order")
    end, { max = N, timeout = 30 }))
    local t3 = core.now()
    print(("\n  20,000 messages: sent in %.2fs, acked and cleaned up %.2fs later, consumed in %.2fs")
      :format(t1 - t0, t2 - t1, t3 - t2))
    assert.equal(0, env.scalar(r, "select count(*)::int8 from msgbus.messages"))
    -- statistics reach pg_stat_user_tables with a delay: wait until the index scans
    -- of the message path show, then no table may have one sequential scan per message
    local outbox, inbox = "to_" .. r.service, "to_" .. r.service
    env.wait_until(function() return scans(s)[outbox].idx_scan - s0[outbox].idx_scan >= N end, 30, "sender stats")
    env.wait_until(function() return scans(r)[inbox].idx_scan - r0[inbox].idx_scan >= N end, 30, "receiver stats")
    for _, side in ipairs { { s, s0 }, { r, r0 } } do
      for name, now in pairs(scans(side[1])) do
        local before = side[2][name] and side[2][name].seq_scan or 0
        assert.is_true(now.seq_scan - before < 200,
          ("%s: %d sequential scans of msgbus.%s"):format(side[1].service, now.seq_scan - before, name))
      end
    end
    sb:close()
    rb:close()
  end)
end)
