-- Every public function has a reference entry in the README.
describe("the README", function()
  local readme = assert(io.open("README.md")):read("a")

  local function public(path, pattern, prefix)
    local names = {}
    for name in assert(io.open(path)):read("a"):gmatch(pattern) do
      if not name:match("^_") then names[#names + 1] = prefix .. name end
    end
    assert.is_true(#names > 0, "no public functions found in " .. path)
    return names
  end

  local entries = {}
  for _, n in ipairs(public("lua/msgbus/init.lua", "\nfunction Bus:([%w_]+)%(", "bus:")) do entries[#entries + 1] = n end
  for _, n in ipairs(public("lua/msgbus/init.lua", "\nfunction M%.([%w_]+)%(", "msgbus.")) do entries[#entries + 1] = n end
  for _, n in ipairs(public("lua/msgbus/setup.lua", "\nfunction setup%.([%w_]+)%(", "msgbus.setup.")) do
    entries[#entries + 1] = n
  end

  -- and every command of the msgbus CLI (its parser declares them as command(p, "name", ...))
  local cli = assert(io.open("lua/msgbus/cli.lua")):read("a")
  local commands = 0
  for name in cli:gmatch('command%(p, "([%w-]+)"') do
    commands = commands + 1
    it("has a reference entry for the command msgbus " .. name, function()
      assert.is_truthy(readme:find("\n### msgbus " .. name .. "\n", 1, true),
        "README.md has no '### msgbus " .. name .. "' heading")
    end)
  end
  it("found the CLI's commands", function() assert.is_true(commands >= 9) end)

  for _, name in ipairs(entries) do
    it("has a reference entry for " .. name, function()
      assert.is_truthy(readme:find("### " .. name .. "(", 1, true) or readme:find("### [^\n]*" .. name:gsub("%p", "%%%0")),
        "README.md has no '### " .. name .. "(...)' heading")
    end)
  end
end)
