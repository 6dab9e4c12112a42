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

  for _, name in ipairs(entries) do
    it("has a reference entry for " .. name, function()
      assert.is_truthy(readme:find("### " .. name .. "(", 1, true) or readme:find("### [^\n]*" .. name:gsub("%p", "%%%0")),
        "README.md has no '### " .. name .. "(...)' heading")
    end)
  end
end)
