-- Fault 5: the network between two servers is cut for longer than the replication
-- timeouts, under load, then heals; delivery resumes by itself, and the checker of
-- the fault specs (spec/helpers/fault.lua) finds nothing the promise forbids.
--
-- Each cluster runs in its own network namespace, its own host. The test process
-- (the root namespace) is both services' application host and reaches each server
-- on a management link; the servers reach each other, for replication both ways,
-- only over a third link, and that is the one cut:
--
--   root mbnc<pid>a 10.203.X.1/30 ---- mgmt 10.203.X.2 [ns A: sender's cluster]
--   root mbnc<pid>b 10.203.X.5/30 ---- mgmt 10.203.X.6 [ns B: receiver's cluster]
--   [ns A] cut 10.203.X.9/30 ------------- cut 10.203.X.10 [ns B]
--
-- The cut is an nftables rule in both namespaces that drops every packet arriving
-- on the A-B link: each kernel still transmits, nothing answers, no RST or ICMP comes
-- back, so TCP sees a silent partition, as with a pulled cable between two machines,
-- and only the timeouts notice. Without nft it falls back to taking the link down
-- (A then gets "network unreachable" at once; B's packets still vanish).
-- Needs root and iproute2 (nftables for the silent cut); otherwise the test is
-- pending. Run alone with `make check SPECS=spec/45-netcut_spec.lua`.
local core = require "msgbus.core"
local cluster = require "msgbus.cluster"
local env = require "helpers.env"
local fault = require "helpers.fault"

local TIMEOUT = 3       -- wal_sender_timeout and wal_receiver_timeout, seconds
local CUT = 10          -- how long the link stays cut, seconds: over 3 timeouts
local PACE = 0.02       -- the sender's pause between sends

-- Runs a shell command; success and its combined output.
local function sh(cmd)
  local p = assert(io.popen("( " .. cmd .. " ) 2>&1", "r"))
  local out = p:read("a")
  return p:close() == true, out
end

---------------------------------------------------------------------------
-- The network
---------------------------------------------------------------------------

local NFT_CUT = [[add table inet msgbus_cut; ]]
  .. [[add chain inet msgbus_cut input { type filter hook input priority 0; policy accept; }; ]]
  .. [[add rule inet msgbus_cut input iifname "cut" counter drop]]

local function in_ns(ns, cmd)
  return sh(("ip netns exec %s %s"):format(ns, cmd))
end

local Net = {}
Net.__index = Net

-- Everything this process's network may have left, also by an earlier process that
-- had the same pid (names are per pid, so other runs are never touched).
function Net:destroy()
  for _, cmd in ipairs { "ip netns del " .. self.a, "ip netns del " .. self.b,
                         "ip link del " .. self.root_a, "ip link del " .. self.root_b } do
    sh(cmd)
  end
end

function Net:cut()
  if self.method == "nft" then
    for _, ns in ipairs { self.a, self.b } do assert(in_ns(ns, "nft '" .. NFT_CUT .. "'")) end
  else
    assert(sh(("ip -n %s link set cut down"):format(self.a)))
  end
end

-- Lifts the cut; returns the number of packets it dropped (nil without nft).
function Net:heal()
  if self.method ~= "nft" then
    assert(sh(("ip -n %s link set cut up"):format(self.a)))
    return nil
  end
  local dropped = 0
  for _, ns in ipairs { self.a, self.b } do
    local _, rules = assert(in_ns(ns, "nft list table inet msgbus_cut"))
    dropped = dropped + assert(tonumber(rules:match("packets (%d+)")), rules)
    assert(in_ns(ns, "nft delete table inet msgbus_cut"))
  end
  return dropped
end

-- Namespaces A and B with their links (see the top of the file), or nil and why not.
local function make_net()
  local _, uid = sh("id -u")
  if uid:match("%d+") ~= "0" then return nil, "network namespaces need root" end
  if not sh("command -v ip") then return nil, "ip (Debian package iproute2) is not installed" end
  local pid = assert(cluster.self_pid())
  local net = setmetatable({ a = "msgbus_nc" .. pid .. "a", b = "msgbus_nc" .. pid .. "b",
                             root_a = "mbnc" .. pid .. "a", root_b = "mbnc" .. pid .. "b" }, Net)
  net:destroy()
  -- a 10.203.X.0/24 that nothing in the root namespace uses (another run, leftovers)
  local _, used = sh("ip -4 -o addr show; ip -4 route show")
  for k = 0, 249 do
    local x = (tonumber(pid) + k) % 250 + 1
    if not used:find("10.203." .. x .. ".", 1, true) then net.x = x break end
  end
  if not net.x then return nil, "no free 10.203.X.0/24 for the test network" end
  local function addr(n) return ("10.203.%d.%d"):format(net.x, n) end
  net.mgmt_a, net.mgmt_b, net.link_a, net.link_b = addr(2), addr(6), addr(9), addr(10)
  local steps = {
    "ip netns add " .. net.a, "ip netns add " .. net.b,
    ("ip link add %s type veth peer name mgmt netns %s"):format(net.root_a, net.a),
    ("ip link add %s type veth peer name mgmt netns %s"):format(net.root_b, net.b),
    ("ip -n %s link add cut type veth peer name cut netns %s"):format(net.a, net.b),
    ("ip addr add %s/30 dev %s"):format(addr(1), net.root_a), "ip link set up dev " .. net.root_a,
    ("ip addr add %s/30 dev %s"):format(addr(5), net.root_b), "ip link set up dev " .. net.root_b,
  }
  for _, side in ipairs { { net.a, net.mgmt_a, net.link_a }, { net.b, net.mgmt_b, net.link_b } } do
    local ns, mgmt, link = side[1], side[2], side[3]
    steps[#steps + 1] = ("ip -n %s link set up dev lo"):format(ns)
    steps[#steps + 1] = ("ip -n %s addr add %s/30 dev mgmt"):format(ns, mgmt)
    steps[#steps + 1] = ("ip -n %s link set up dev mgmt"):format(ns)
    steps[#steps + 1] = ("ip -n %s addr add %s/30 dev cut"):format(ns, link)
    steps[#steps + 1] = ("ip -n %s link set up dev cut"):format(ns)
  end
  for _, cmd in ipairs(steps) do
    local ok, out = sh(cmd)
    if not ok then
      net:destroy()
      return nil, ("cannot make the test network: `%s`: %s"):format(cmd, out:gsub("%s+$", ""))
    end
  end
  net.method = (sh("command -v nft") and in_ns(net.a, "nft 'add table inet msgbus_probe; delete table inet msgbus_probe'"))
    and "nft" or "link down"
  return net
end

---------------------------------------------------------------------------
-- The services at work
---------------------------------------------------------------------------

-- The application, in this process: each tick sends "seq" messages { i = 1, 2, ... }
-- (single-message transactions, and every 20th tick one transaction of 50) while
-- `sending`, then hands what has arrived to a handler that records (msg, sender, i)
-- in `handled` in its own transaction (a second handling goes to `dupes`), as the
-- listener of spec/40 does. Neither server is cut off from this process.
local function app(s, r)
  local a = { sending = true, i = 0, ticks = 0,
              sent = { confirmed = {}, attempted = {}, n_confirmed = 0, n_failed = 0 } }
  local sb, rb = env.connect(s), env.connect(r)
  local function handler(m)
    local _, n = assert(rb:exec(
      "insert into handled (msg, sender, i) values ($1, $2, $3) on conflict (msg) do nothing",
      m.id, m.sender, m.data.i))
    if n == 0 then assert(rb:exec("insert into dupes (msg) values ($1)", m.id)) end
  end
  local function confirm(first, ids)
    for k, id in ipairs(ids) do
      a.sent.confirmed[first + k - 1], a.sent.attempted[first + k - 1] = id, true
    end
    a.sent.n_confirmed = a.sent.n_confirmed + #ids
  end

  function a.tick()
    if a.sending then
      a.ticks = a.ticks + 1
      local first = a.i + 1
      local n = a.ticks % 20 == 0 and 50 or 1
      a.i = a.i + n
      local ids, err = sb:transaction(function()
        local ids = {}
        for k = first, first + n - 1 do ids[#ids + 1] = assert(sb:send(r.service, "seq", { i = k })) end
        return ids
      end)
      -- the sender's own server is never out of reach: a failed send is a failure
      assert(ids, err)
      confirm(first, ids)
    end
    assert(rb:step(handler, { max = 200 }))
    core.sleep(PACE)
  end

  -- Tick until fn() is truthy; the time it took, or an error after `timeout`.
  function a.run_until(fn, timeout, what)
    local t0 = core.now()
    while not fn() do
      if core.now() - t0 > timeout then error(("timed out after %gs waiting for %s"):format(timeout, what), 2) end
      a.tick()
    end
    return core.now() - t0
  end

  function a.close() sb:close(); rb:close() end
  return a
end

describe("network cut #fault #netns", function()
  it("cut between the servers longer than the replication timeouts, under load: delivery resumes on heal, "
     .. "nothing lost, duplicated or reordered, all acknowledged", function()
    local t0 = core.now()
    local net, why = make_net()
    if not net then
      pending("network namespaces unavailable: " .. why)
      return
    end
    local clusters, running = {}, nil
    finally(function()
      if running then pcall(running.close) end
      for _, c in ipairs(clusters) do pcall(c.destroy, c) end
      net:destroy()
      print(("  (%.1fs)"):format(core.now() - t0))
    end)

    -- the replication timeouts are what notice the cut (TCP keepalives would not:
    -- both ends keep unacknowledged data in flight); a failed apply worker retries
    -- every second
    local settings = { wal_sender_timeout = TIMEOUT .. "s", wal_receiver_timeout = TIMEOUT .. "s",
                       wal_retrieve_retry_interval = "1s" }
    for k, side in ipairs { { "netcut_a", net.a, net.mgmt_a, net.link_a }, { "netcut_b", net.b, net.mgmt_b, net.link_b } } do
      clusters[k] = assert(cluster.start { name = side[1], base = os.getenv("MSGBUS_TEST_DIR"), netns = side[2],
        host = side[3], listen_addresses = side[3] .. "," .. side[4], settings = settings })
    end
    -- each server reaches the other's database over the A-B link only. A connection
    -- attempt an apply worker begins during the cut waits on the kernel's SYN retries
    -- (PostgreSQL 15's apply worker does not apply connect_timeout), so the time to
    -- resume after the heal is mostly the wait for the next SYN.
    local s, r = env.linked_on({ "ncs", "ncr" }, clusters, { { host = net.link_a }, { host = net.link_b } })
    local logs = fault.log_marks(s, r)
    -- both directions run before the cut: a message went there and its ack came back
    local sb = env.connect(s)
    local warm = assert(sb:send(r.service, "warmup", {}))
    assert.is_true(sb:wait_ack(warm, 60))
    sb:close()
    env.exec(r, "delete from msgbus.inbox where id = $1::uuid", warm)
    fault.prepare_receiver(r)

    -- the walsender of each direction is up while its slot (named as the subscription
    -- it feeds) is active
    local slot_sr, slot_rs = fault.sub_name(s, r), fault.sub_name(r, s)
    local function streaming(svc, slot)
      return env.scalar(svc, "select active from pg_replication_slots where slot_name = $1", slot)
    end
    -- what reached the receiver's database: handled, or waiting in its inbox
    local function arrived()
      return env.scalar(r, "select (select count(*) from handled) + (select count(*) from msgbus.inbox)")
    end

    local a = app(s, r)
    running = a
    a.run_until(function() return fault.handled(r) >= 100 end, 60, "100 messages handled")
    assert.is_true(streaming(s, slot_sr) and streaming(r, slot_rs), "replication was not running before the cut")

    -- the cut
    local sent_at_cut = a.sent.n_confirmed
    local cut_at = core.now()
    net:cut()
    local stopped = a.run_until(function() return not streaming(s, slot_sr) and not streaming(r, slot_rs) end,
      CUT, "both walsenders to give up (replication timeout) during the cut")
    local arrived_stopped, outbox_stopped = arrived(), fault.outbox(s)
    a.run_until(function() return core.now() - cut_at >= CUT end, CUT + 5, "the end of the cut")
    local arrived_end, outbox_end = arrived(), fault.outbox(s)
    local sent_in_cut = a.sent.n_confirmed - sent_at_cut
    local first_in_cut = a.sent.confirmed[sent_at_cut + 1]
    -- replication really stopped: nothing crossed while the sender kept sending
    assert.is_false(streaming(s, slot_sr), "the sender's walsender came back during the cut")
    assert.is_false(streaming(r, slot_rs), "the receiver's walsender came back during the cut")
    assert.equal(arrived_stopped, arrived_end, "messages reached the receiver during the cut")
    assert.is_true(outbox_end > outbox_stopped, "the outbox did not grow during the cut")

    -- the heal: the sender goes on until both directions work again, then stops
    local dropped = net:heal()
    local healed_at = core.now()
    local delivery, acks
    a.run_until(function()
      delivery = delivery or (arrived() > arrived_end and core.now() - healed_at)
      acks = acks or (env.scalar(s, "select msgbus.acked($1::uuid)", first_in_cut) and core.now() - healed_at)
      return delivery and acks
    end, 60, "delivery and acks to resume after the heal")
    a.sending = false
    local all = {} -- seconds after the heal until every message arrived, was acknowledged
    a.run_until(function()
      local t = core.now() - healed_at
      all.arrived = all.arrived or (arrived() == a.sent.n_confirmed and t)
      all.acked = all.acked or (fault.outbox(s) == 0 and t)
      return all.acked and fault.inbox(r) == 0 and fault.outbox(r) == 0
    end, 120, "everything handled and acknowledged")
    all.handled = core.now() - healed_at
    a.close()
    running = nil

    -- apply errors are reported, not asserted: the cut loses connections, which
    -- PostgreSQL 15 counts as apply errors (the server logs are checked instead)
    local c = fault.check("network cut", s, r, a.sent)
    print(("  [network cut] cut by %s for %.1fs (timeouts %ds): both walsenders gone %.1fs after the cut; "
      .. "%d messages sent during the cut (outbox %d -> %d, arrived stayed at %d)%s")
      :format(net.method, healed_at - cut_at, TIMEOUT, stopped, sent_in_cut, outbox_stopped, outbox_end,
        arrived_end, dropped and (", %d packets dropped"):format(dropped) or ""))
    print(("  [network cut] after the heal: first delivery %.2fs, first ack of a cut-time message %.2fs; "
      .. "all %d arrived %.2fs, all acknowledged %.2fs, all handled %.2fs")
      :format(delivery, acks, a.sent.n_confirmed, all.arrived, all.acked, all.handled))
    assert.is_true(sent_in_cut >= 100, "too few messages were sent during the cut")
    if dropped then assert.is_true(dropped > 0, "the cut dropped no packet") end
    fault.assert_promise(c)
    assert.same({}, fault.log_errors(s, r, logs))
  end)
end)
