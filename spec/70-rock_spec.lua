-- The rock installs and works from a clean LuaRocks tree, away from the source tree.
local core = require "msgbus.core"
local env = require "helpers.env"

local function sh(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function run(cmd)
  local p = io.popen("( " .. cmd .. " ) 2>&1", "r")
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

describe("the rock", function()
  it("installs with luarocks make and runs from its tree", function()
    local tmp = assert(io.popen("mktemp -d"):read("l"))
    -- build from a copy: luarocks make leaves objects in the folder it builds in
    local ok, out = run(("git ls-files -z | xargs -0 cp --parents -t %s"):format(sh(tmp)))
    assert(ok, out)
    ok, out = run(("cd %s && luarocks --lua-version 5.4 --tree %s/tree make --deps-mode none LIBPQ_INCDIR=%s")
      :format(sh(tmp), sh(tmp), sh(io.popen("pg_config --includedir"):read("l"))))
    assert(ok, out)
    assert.matches("msgbus scm%-1 is now installed", out)

    local c = env.cluster("a")
    local db = "rock" .. core.random_hex(2)
    assert(c:createdb(db))
    local script = ([[
      local msgbus = require "msgbus"
      assert(package.searchpath("msgbus.core", package.cpath):find(%q, 1, true), "core from elsewhere")
      assert(msgbus.setup.install(%q, %q))
      local bus = assert(msgbus.connect(%q))
      io.write(bus.service, " ", msgbus.encode({ n = 1 }))
      bus:close()]]):format(tmp, c:conninfo(db), db, c:conninfo(db))
    ok, out = run(("cd / && LUA_PATH=%s LUA_CPATH=%s lua5.4 -e %s"):format(
      sh(tmp .. "/tree/share/lua/5.4/?.lua;" .. tmp .. "/tree/share/lua/5.4/?/init.lua"),
      sh(tmp .. "/tree/lib/lua/5.4/?.so"), sh(script)))
    run("rm -rf " .. sh(tmp))
    assert(ok, out)
    assert.equal(db .. ' {"n":1}', out)
  end)
end)
