-- msgbus.cluster: the throwaway servers every other spec stands on.
local cluster = require "msgbus.cluster"

local function exists(path)
  return os.execute("test -e " .. cluster.shell_quote(path)) == true
end

describe("msgbus.cluster", function()
  local a, b

  setup(function()
    local err
    a, err = cluster.start { name = "spec_a", base = os.getenv("MSGBUS_TEST_DIR"), settings = { max_slot_wal_keep_size = "64MB" } }
    assert(a, err)
    b, err = cluster.start { name = "spec_b", base = os.getenv("MSGBUS_TEST_DIR") }
    assert(b, err)
  end)

  teardown(function()
    if a then a:destroy() end
    if b then b:destroy() end
  end)

  it("starts two independent servers that answer", function()
    assert.equal("1", assert(a:psql("select 1")):match("^%s*(.-)%s*$"))
    assert.equal("1", assert(b:psql("select 1")):match("^%s*(.-)%s*$"))
    assert.is_true(a:running())
    assert.not_equal(a.port, b.port)
    assert.equal(("host=127.0.0.1 port=%d dbname=postgres user=postgres"):format(a.port), a:conninfo())
    assert.equal(("host=127.0.0.1 port=%d dbname=x user=postgres"):format(b.port), b:conninfo("x"))
    local sql = "select system_identifier from pg_control_system()"
    local ida, idb = assert(a:psql(sql)), assert(b:psql(sql))
    assert.matches("^%d+%s*$", ida)
    assert.matches("^%d+%s*$", idb)
    assert.not_equal(ida, idb)
  end)

  it("is set up for logical replication with the caller's settings", function()
    assert.equal("logical", assert(a:psql("show wal_level")):match("%S+"))
    assert.equal("logical", assert(b:psql("show wal_level")):match("%S+"))
    assert.equal("64MB", assert(a:psql("show max_slot_wal_keep_size")):match("%S+"))
    assert.equal("32", assert(a:psql("show max_replication_slots")):match("%S+"))
  end)

  it("reports SQL errors with psql's message", function()
    local out, err = a:psql("select no_such_column")
    assert.is_nil(out)
    assert.matches("msgbus.cluster: ", err, 1, true)
    assert.matches("no_such_column", err, 1, true)
  end)

  it("creates a database, and again without complaint", function()
    assert.is_true(a:createdb("spec_db"))
    assert.is_true(a:createdb("spec_db"))
    assert.equal("1", assert(a:psql("select count(*) from pg_database where datname = 'spec_db'")):match("%S+"))
    assert.equal("spec_db", assert(a:psql("select current_database()", "spec_db")):match("%S+"))
  end)

  it("survives kill -9 with committed data intact", function()
    assert(b:createdb("crash"))
    assert(b:psql("create table t (v int); insert into t select generate_series(1, 1000);", "crash"))
    assert.is_true(b:kill9())
    assert.is_false(b:running())
    local out, err = b:psql("select 1", "crash")
    assert.is_nil(out)
    assert.matches("port " .. b.port, err, 1, true)
    assert.is_true(b:start())
    assert.is_true(b:running())
    assert.equal("1000|500500", assert(b:psql("select count(*), sum(v) from t", "crash")):match("%S+"))
  end)

  it("stops, starts and restarts", function()
    assert.is_true(b:stop())
    assert.is_false(b:running())
    assert.is_nil(b:psql("select 1"))
    assert.is_true(b:start())
    assert.equal("1", assert(b:psql("select 1")):match("%S+"))
    local before = assert(b:psql("select pg_postmaster_start_time()"))
    assert.is_true(b:restart())
    assert.not_equal(before, assert(b:psql("select pg_postmaster_start_time()")))
  end)

  it("keeps a server log", function()
    assert.is_nil(a:psql("select 1/0"))
    local log = a:log(200)
    assert.matches("division by zero", log, 1, true)
    local _, newlines = a:log(3):gsub("\n", "")
    assert.is_true(newlines <= 2)
  end)

  it("removes its folder on destroy", function()
    local c = assert(cluster.start { name = "spec_gone", base = os.getenv("MSGBUS_TEST_DIR") })
    local dir = c.dir
    assert.is_true(exists(c.datadir .. "/PG_VERSION"))
    assert.is_true(c:destroy())
    assert.is_false(exists(dir))
    assert.is_nil(c:psql("select 1"))
  end)

  -- In a child process, so that destroy_all cannot touch clusters of this one.
  local function child(body)
    local script = ("package.path = %q\nlocal cluster = require 'msgbus.cluster'\n%s"):format(package.path, body)
    local p = assert(io.popen("lua5.4 -e " .. cluster.shell_quote(script) .. " 2>&1"))
    local out = p:read("a")
    assert(p:close(), out)
    return out
  end

  it("destroy_all removes every cluster of the process", function()
    local out = child([[
      local base = os.getenv("MSGBUS_TEST_DIR")
      local c1 = assert(cluster.start{ name = "all1", base = base })
      local c2 = assert(cluster.start{ name = "all2", base = base })
      io.write(c1.dir, "\n", c2.dir, "\n", c1.port, "\n")
      assert(cluster.destroy_all())]])
    local d1, d2, port = out:match("^(%S+)\n(%S+)\n(%d+)\n$")
    assert.is_string(d1, out)
    assert.is_false(exists(d1))
    assert.is_false(exists(d2))
    local probe = setmetatable({ port = tonumber(port), host = "127.0.0.1", superuser = "postgres", name = "probe" },
                               { __index = getmetatable(a).__index })
    assert.is_nil(probe:psql("select 1"))
  end)

  it("cleans up when the process ends without destroy_all", function()
    local out = child([[
      local c = assert(cluster.start{ name = "atexit", base = os.getenv("MSGBUS_TEST_DIR") })
      io.write(c.dir, "\n")]])
    local dir = out:match("^(%S+)\n$")
    assert.is_string(dir, out)
    assert.is_false(exists(dir))
  end)
end)
