-- The exact JSON codec of the C core: integers stay integers, floats round-trip
-- bit for bit and stay floats, strings must be valid UTF-8.
local core = require "msgbus.core"

local encode, decode = core.json_encode, core.json_decode
local null, array_mt = core.json_null, core.json_array_mt

-- Same bits, not just ==: tells -0.0 from 0.0.
local function same_float(a, b)
  return string.pack("<d", a) == string.pack("<d", b)
end

-- Deep equality that also compares number subtypes, float bits and array marks.
local function same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false end
    if math.type(a) == "float" then return same_float(a, b) end
    return a == b
  end
  if type(a) ~= "table" then return a == b end
  if (getmetatable(a) == array_mt) ~= (getmetatable(b) == array_mt) then return false end
  for k, v in pairs(a) do
    if not same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function roundtrip(v)
  return decode(encode(v))
end

local function nested_arrays(depth)
  local t = setmetatable({}, array_mt)
  for _ = 2, depth do t = { t } end
  return t
end

describe("json", function()
  describe("integers", function()
    it("round-trip exactly as integers", function()
      for _, v in ipairs { 0, 1, -1, (1 << 53) + 1, -(1 << 53) - 1, 123456789012345,
                           math.maxinteger, math.mininteger, math.mininteger + 1 } do
        local back = roundtrip(v)
        assert.equal("integer", math.type(back))
        assert.equal(v, back)
      end
    end)

    it("are written as plain decimal text", function()
      assert.equal("0", encode(0))
      assert.equal("-1", encode(-1))
      assert.equal("9007199254740993", encode(9007199254740993))
      assert.equal("9223372036854775807", encode(math.maxinteger))
      assert.equal("-9223372036854775808", encode(math.mininteger))
    end)

    it("decode from text without '.', 'e' or 'E' that fits int64", function()
      assert.equal("integer", math.type(decode "1"))
      assert.equal(1, decode "1")
      assert.equal(-42, decode "-42")
      assert.equal(math.maxinteger, decode "9223372036854775807")
      assert.equal(math.mininteger, decode "-9223372036854775808")
      assert.equal("integer", math.type(decode "-9223372036854775808"))
      assert.equal("integer", math.type(decode "-0"))
    end)

    it("become floats beyond int64", function()
      local v = decode "9223372036854775808"
      assert.equal("float", math.type(v))
      assert.equal(2.0 ^ 63, v)
      v = decode "-9223372036854775809"
      assert.equal("float", math.type(v))
      assert.equal(-(2.0 ^ 63), v)
      v = decode "123456789012345678901234567890"
      assert.equal("float", math.type(v))
      assert.equal(1.2345678901234568e29, v)
    end)
  end)

  describe("floats", function()
    it("round-trip bit for bit and stay floats", function()
      for _, v in ipairs { 0.1, 1 / 3, 1e300, -1e300, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                           0.0, -0.0, 1.0, -1.0, 2.0 ^ 53, 2.0 ^ 63, 2.0 ^ 64, 123.456, math.pi, 1e21, 1e-7 } do
        local back = roundtrip(v)
        assert.equal("float", math.type(back), encode(v))
        assert.is_true(same_float(v, back), encode(v))
      end
    end)

    it("use the shortest exact text", function()
      assert.equal("0.1", encode(0.1))
      assert.equal("0.3333333333333333", encode(1 / 3))
      assert.equal("0.30000000000000004", encode(0.1 + 0.2))
      assert.equal("1e+300", encode(1e300))
      assert.equal("123.456", encode(123.456))
    end)

    it("keep a float marker when integral", function()
      assert.equal("1.0", encode(1.0))
      assert.equal("-0.0", encode(-0.0))
      assert.equal("0.0", encode(0.0))
      assert.equal("9007199254740992.0", encode(2.0 ^ 53))
      assert.equal("float", math.type(decode(encode(1.0))))
      assert.equal(-math.huge, 1 / decode(encode(-0.0)))
    end)

    it("decode from text with '.', 'e' or 'E'", function()
      local cases = { ["1.0"] = 1.0, ["1e2"] = 100.0, ["1E2"] = 100.0, ["1e+2"] = 100.0, ["1e-2"] = 0.01,
                      ["-0.5"] = -0.5, ["0e0"] = 0.0, ["2.5E-3"] = 0.0025, ["-0.0"] = -0.0 }
      for text, want in pairs(cases) do
        local v = decode(text)
        assert.equal("float", math.type(v), text)
        assert.is_true(same_float(want, v), text)
      end
    end)

    it("decode very long number text exactly", function()
      assert.equal(1e-301, decode("0." .. ("0"):rep(300) .. "1"))
      assert.equal(1e100, decode("1" .. ("0"):rep(100)))
      assert.equal(0.1, decode("0.1" .. ("0"):rep(500)))
    end)

    it("refuse NaN and infinity", function()
      for _, v in ipairs { 0 / 0, math.huge, -math.huge } do
        assert.has_error(function() encode(v) end, "msgbus: cannot encode NaN or infinity as JSON")
      end
      assert.error_matches(function() encode { a = { 1, 0 / 0 } } end, "NaN or infinity.*%$%.a%[2%]")
    end)

    it("ignore the process locale's decimal point", function()
      local old = os.setlocale(nil, "numeric")
      local found
      for _, name in ipairs { "de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "ru_RU.UTF-8", "nl_NL.UTF-8" } do
        if os.setlocale(name, "numeric") then
          found = name
          break
        end
      end
      if not found then
        pending("no locale with a decimal comma is installed")
        return
      end
      local ok, err = pcall(function()
        assert.equal("1,5", string.format("%.1f", 1.5)) -- the locale really is active
        assert.equal("1.5", encode(1.5))
        assert.equal("0.1", encode(0.1))
        assert.equal("1.0", encode(1.0))
        assert.equal(1.5, decode "1.5")
        assert.equal(0.001, decode("0.0" .. "01"))
        assert.equal(1e-301, decode("0." .. ("0"):rep(300) .. "1"))
        assert.has_error(function() decode "1,5" end)
      end)
      os.setlocale(old, "numeric")
      assert(ok, err)
    end)
  end)

  describe("strings", function()
    it("escape quotes, backslashes and control characters", function()
      assert.equal([["a\"b\\c/d"]], encode 'a"b\\c/d')
      assert.equal([["\b\f\n\r\t"]], encode "\b\f\n\r\t")
      assert.equal([["\u0000\u0001\u001f\u007f"]], encode "\0\1\31\127")
      for c = 0, 31 do
        local text = encode(string.char(c))
        assert.is_nil(text:find("[%z\1-\31\127]"), c)
        assert.equal(string.char(c), decode(text))
      end
      assert.equal([["\u007f"]], encode "\127")
    end)

    it("write valid non-ASCII UTF-8 as is", function()
      for _, s in ipairs { "é", "€", "😀", "\u{7FF}", "\u{800}", "\u{D7FF}", "\u{E000}", "\u{FFFF}",
                           "\u{10000}", "\u{10FFFF}", "Grüße, 世界" } do
        assert.equal('"' .. s .. '"', encode(s))
        assert.equal(s, roundtrip(s))
      end
    end)

    it("refuse invalid UTF-8", function()
      local bad = {
        "\xC0\x80", "\xC1\xBF", "\xE0\x80\xAF", "\xF0\x80\x80\x80", -- overlong
        "\xED\xA0\x80", "\xED\xBF\xBF", -- surrogates D800, DFFF
        "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", -- above U+10FFFF
        "\xE2\x82", "\xF0\x9F\x98", "\xC3", "abc\xE2", -- truncated
        "\x80", "\xBF", "\xFF", "\xFE", "\xC3\x28", "\xE2\x28\xA1", -- stray or bad continuation
      }
      for _, s in ipairs(bad) do
        assert.has_error(function() encode(s) end, "msgbus: string is not valid UTF-8")
        assert.error_matches(function() decode('"' .. s .. '"') end, "^msgbus: invalid JSON at byte %d+: invalid UTF%-8")
      end
    end)

    it("check object keys and say where the bad string is", function()
      assert.error_matches(function() encode { ["\xFF"] = 1 } end, "^msgbus: object key is not valid UTF%-8")
      assert.error_matches(function() encode { a = { "ok", { b = "\xC0\x80" } } } end,
        "^msgbus: string is not valid UTF%-8 %(at %$%.a%[2%]%.b%)$")
      assert.error_matches(function() encode { ["x y"] = { "\xFF" } } end, '%(at %$%["x y"%]%[1%]%)$')
    end)

    it("decode every escape", function()
      assert.equal('"\\/\b\f\n\r\t', decode [["\"\\\/\b\f\n\r\t"]])
      assert.equal("é€", decode [["\u00e9\u20AC"]])
      assert.equal("😀", decode [["\ud83d\ude00"]])
      assert.equal("😀", decode [["\uD83D\uDE00"]])
      assert.equal("\u{10FFFF}", decode [["\uDBFF\uDFFF"]])
      assert.equal("\u{10000}", decode [["\uD800\uDC00"]])
      assert.equal("x\u{FFFF}y", decode [["x\uffffy"]])
    end)

    it("keep NUL bytes from \\u0000", function()
      local s = decode [["a\u0000b"]]
      assert.equal(3, #s)
      assert.equal("a\0b", s)
      assert.equal("a\0b", roundtrip("a\0b"))
    end)

    it("refuse lone surrogates and bad escapes", function()
      local bad = {
        [["\ud800"]], [["\udbff x"]], [["\udc00"]], [["\ude00\ud83d"]], [["\ud800\u0041"]], [["\ud800\n"]],
        [["\u12"]], [["\u12g4"]], [["\x41"]], [["\'"]], [["\U0041"]], '"\\', '"\\u',
      }
      for _, text in ipairs(bad) do
        assert.error_matches(function() decode(text) end, "^msgbus: invalid JSON at byte %d+: ", nil, nil, text)
      end
      assert.error_matches(function() decode [["ab\ud800"]] end, "at byte 4: lone high surrogate")
      assert.error_matches(function() decode [["\udc00"]] end, "lone low surrogate")
    end)

    it("refuse raw control characters but accept a raw DEL", function()
      for c = 0, 31 do
        assert.error_matches(function() decode('"a' .. string.char(c) .. '"') end, "at byte 3: control character")
      end
      assert.equal("\127", decode '"\127"')
    end)

    it("handle long strings with many escapes", function()
      local parts = {}
      for i = 1, 100000 do parts[i] = string.char(i % 128) .. "é" end
      local s = table.concat(parts)
      local text = encode(s)
      assert.is_true(#text > #s)
      assert.equal(s, decode(text))
    end)
  end)

  describe("tables", function()
    it("encode an empty table as an object", function()
      assert.equal("{}", encode {})
      assert.equal("{}", encode(setmetatable({}, { __jsontype = "object" })))
    end)

    it("encode an empty table marked as array as []", function()
      assert.equal("[]", encode(setmetatable({}, array_mt)))
      assert.equal("[]", encode(setmetatable({}, { __jsontype = "array" })))
      assert.equal("array", array_mt.__jsontype)
      assert.equal("[1,2]", encode(setmetatable({ 1, 2 }, array_mt)))
    end)

    it("encode sequences as arrays and string keys as sorted objects", function()
      assert.equal("[1,2.5,\"x\",true,false]", encode { 1, 2.5, "x", true, false })
      assert.equal('{"a":2,"b":1,"c":3}', encode { b = 1, a = 2, c = 3 })
      -- bytewise order: uppercase before lowercase, "z" before "é", a prefix first
      assert.equal('{"B":1,"a":2,"ab":3,"z":4,"é":5}', encode { ["é"] = 5, z = 4, ab = 3, a = 2, B = 1 })
      assert.equal('{"":0,"\\u0000":1}', encode { ["\0"] = 1, [""] = 0 })
    end)

    it("give the same text for equal tables", function()
      local a, b = {}, {}
      for i = 1, 200 do a["k" .. i] = i end
      for i = 200, 1, -1 do b["k" .. i] = i end
      assert.equal(encode(a), encode(b))
    end)

    it("refuse mixed and sparse keys", function()
      local mixed = "^msgbus: table has mixed string and integer keys"
      local sparse = "^msgbus: table has sparse integer keys"
      assert.error_matches(function() encode { 1, 2, a = 3 } end, mixed)
      assert.error_matches(function() encode { 1, 2, nil, 4 } end, sparse)
      assert.error_matches(function() encode { [2] = "x" } end, sparse)
      assert.error_matches(function() encode { [0] = "x", "y" } end, sparse)
      assert.error_matches(function() encode { [-1] = "x" } end, sparse)
      assert.error_matches(function() encode { [1.5] = "x" } end, "^msgbus: table has a non%-integer number key")
      assert.error_matches(function() encode { [true] = "x" } end, "^msgbus: table has a boolean key")
      assert.error_matches(function() encode { [{}] = "x" } end, "^msgbus: table has a table key")
      assert.error_matches(function() encode { a = { b = { 1, [3] = 3 } } } end, sparse .. ".*%(at %$%.a%.b%)$")
    end)

    it("check marked kinds", function()
      assert.error_matches(function() encode(setmetatable({ a = 1 }, array_mt)) end,
        "^msgbus: table marked as array has string keys")
      assert.error_matches(function() encode(setmetatable({ 1 }, { __jsontype = "object" })) end,
        "^msgbus: table marked as object has integer keys")
      assert.error_matches(function() encode(setmetatable({}, { __jsontype = "list" })) end,
        '^msgbus: __jsontype must be "array" or "object"')
      -- other metatables are ignored, and metamethods are not used
      local t = setmetatable({ a = 1 }, { __index = function() return 2 end, __pairs = error })
      assert.equal('{"a":1}', encode(t))
    end)

    it("decode arrays with json_array_mt, so empty arrays stay arrays", function()
      local t = decode "[]"
      assert.equal(array_mt, getmetatable(t))
      assert.equal("[]", encode(t))
      t = decode "[1,[2],{}]"
      assert.equal(array_mt, getmetatable(t))
      assert.equal(array_mt, getmetatable(t[2]))
      assert.is_nil(getmetatable(t[3]))
      assert.equal("{}", encode(decode "{}"))
      assert.equal('{"a":[],"b":{}}', encode(decode '{"b":{},"a":[]}'))
    end)

    it("keep the last of repeated object keys", function()
      assert.equal(2, decode('{"a":1,"a":2}').a)
    end)

    it("encode a table shared by two parents", function()
      local shared = { 1, 2 }
      assert.equal('{"a":[1,2],"b":[1,2]}', encode { a = shared, b = shared })
    end)
  end)

  describe("null", function()
    it("is a light userdata sentinel both ways", function()
      assert.equal("userdata", type(null))
      assert.equal("null", encode(null))
      assert.equal(null, decode "null")
      local t = decode "[1,null,3]"
      assert.equal(3, #t)
      assert.equal(null, t[2])
      assert.equal("[1,null,3]", encode(t))
      assert.equal(null, decode('{"a":null}').a)
    end)
  end)

  describe("other values", function()
    it("are refused with their type", function()
      assert.has_error(function() encode(print) end, "msgbus: cannot encode function as JSON")
      assert.has_error(function() encode(coroutine.create(print)) end, "msgbus: cannot encode thread as JSON")
      assert.has_error(function() encode(io.stdout) end, "msgbus: cannot encode userdata as JSON")
      assert.error_matches(function() encode(nil) end, "^msgbus: cannot encode nil as JSON")
      assert.error_matches(function() encode() end, "^msgbus: cannot encode nil as JSON")
      assert.error_matches(function() encode { f = print } end, "cannot encode function as JSON %(at %$%.f%)")
    end)

    it("booleans round-trip", function()
      assert.equal("true", encode(true))
      assert.equal("false", encode(false))
      assert.is_true(decode "true")
      assert.is_false(decode "false")
    end)
  end)

  describe("nesting", function()
    it("is limited to 100 levels by default, both ways", function()
      assert.equal(("["):rep(100) .. ("]"):rep(100), encode(nested_arrays(100)))
      assert.has_error(function() encode(nested_arrays(101)) end, "msgbus: JSON nesting deeper than 100")
      assert.equal(100, select(2, encode(roundtrip(nested_arrays(100))):gsub("%[", "")))
      assert.error_matches(function() decode(("["):rep(101) .. ("]"):rep(101)) end,
        "^msgbus: JSON nesting deeper than 100 at byte 101")
      assert.error_matches(function() decode(('{"a":'):rep(101) .. "1" .. ("}"):rep(101)) end,
        "^msgbus: JSON nesting deeper than 100")
    end)

    it("takes a maxdepth argument", function()
      assert.equal("[[[]]]", encode(nested_arrays(3), 3))
      assert.has_error(function() encode(nested_arrays(3), 2) end, "msgbus: JSON nesting deeper than 2")
      assert.equal(1, decode("1", 0))
      assert.has_error(function() encode({}, 0) end, "msgbus: JSON nesting deeper than 0")
      assert.error_matches(function() decode("[[1]]", 1) end, "nesting deeper than 1")
      local deep = nested_arrays(1000)
      local text = encode(deep, 1000)
      assert.equal(2000, #text)
      assert.equal(text, encode(decode(text, 1000), 1000))
      assert.has_error(function() encode({}, 1001) end)
      assert.has_error(function() decode("1", -1) end)
    end)

    it("turns reference cycles into a nesting error", function()
      local t = {}
      t.self = t
      assert.has_error(function() encode(t) end, "msgbus: JSON nesting deeper than 100")
      local a, b = {}, {}
      a[1], b[1] = b, a
      assert.has_error(function() encode(a) end, "msgbus: JSON nesting deeper than 100")
    end)
  end)

  describe("decoding", function()
    it("reads PostgreSQL jsonb output", function()
      local v = decode '{"a": 1, "b": [1.0, "x"], "c": {"d": null, "e": [true, false]}, "f": -2.5e-3}'
      assert.equal(1, v.a)
      assert.equal("integer", math.type(v.a))
      assert.equal("float", math.type(v.b[1]))
      assert.equal("x", v.b[2])
      assert.equal(null, v.c.d)
      assert.is_false(v.c.e[2])
      assert.equal(-0.0025, v.f)
      assert.equal('{"a":1,"b":[1.0,"x"],"c":{"d":null,"e":[true,false]},"f":-0.0025}', encode(v))
    end)

    it("allows JSON whitespace around everything", function()
      assert.is_true(same({ a = setmetatable({ 1, 2 }, array_mt) }, decode " \t\r\n{ \"a\" : [ 1 , 2 ] } \n"))
      assert.equal(array_mt, getmetatable(decode "[ ]"))
      assert.equal(7, decode "\n7\t")
    end)

    it("refuses trailing garbage", function()
      for _, text in ipairs { "1 x", "{} {}", "[1]]", "nullx", "true false", '"a""b"', "1 2", "[1] ,", "0x10" } do
        assert.error_matches(function() decode(text) end, "trailing garbage", nil, nil, text)
      end
      assert.error_matches(function() decode "[1] x" end, "^msgbus: invalid JSON at byte 5: trailing garbage")
    end)

    it("refuses what RFC 8259 does not allow", function()
      local bad = {
        "", " ", "[", "]", "{", "[1,]", "[,1]", "{\"a\":1,}", "{a:1}", "{'a':1}", "{\"a\" 1}", "{\"a\":}", "{1:2}",
        "01", "-01", "00", "+1", ".5", "1.", "1.e5", "-", "1e", "1e+", "--1", "NaN", "Infinity", "-Infinity",
        "tru", "nul", "True", "undefined", "'a'", "\"abc", "[1 2]", "\f1", "\v1", "1\f", "\xEF\xBB\xBF1", "/*c*/1",
      }
      for _, text in ipairs(bad) do
        assert.error_matches(function() decode(text) end, "^msgbus: invalid JSON at byte %d+: .+", nil, nil,
          ("%q"):format(text))
      end
    end)

    it("reports the byte where it failed", function()
      assert.has_error(function() decode "" end, "msgbus: invalid JSON at byte 1: unexpected end of input")
      assert.has_error(function() decode "[1,]" end, "msgbus: invalid JSON at byte 4: expected a JSON value, got ']'")
      assert.has_error(function() decode '{"a" 1}' end, "msgbus: invalid JSON at byte 6: expected ':', got '1'")
      assert.has_error(function() decode "[1" end, "msgbus: invalid JSON at byte 3: expected ',' or ']', got end of input")
      assert.has_error(function() decode "01" end, "msgbus: invalid JSON at byte 1: leading zero in number")
      assert.has_error(function() decode '"abc' end, "msgbus: invalid JSON at byte 1: unterminated string")
    end)

    it("needs a string", function()
      assert.has_error(function() decode {} end)
      assert.has_error(function() decode() end)
    end)
  end)

  describe("random nested values", function()
    -- Any double but NaN and infinity, from random bits.
    local function random_float()
      while true do
        local x = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
        if x == x and x ~= math.huge and x ~= -math.huge then return x end
      end
    end

    -- Random valid UTF-8 including control characters, NUL and 4-byte sequences.
    local function random_string()
      local cps = {}
      for i = 1, math.random(0, 12) do
        local r = math.random(1, 10)
        local cp
        if r <= 5 then cp = math.random(0, 127)
        elseif r <= 7 then cp = math.random(128, 0x7FF)
        elseif r <= 9 then
          repeat cp = math.random(0x800, 0xFFFF) until cp < 0xD800 or cp > 0xDFFF
        else cp = math.random(0x10000, 0x10FFFF) end
        cps[i] = utf8.char(cp)
      end
      return table.concat(cps)
    end

    local random_value
    local function random_table(depth)
      local n = math.random(0, 5)
      local t
      if math.random(2) == 1 then
        t = setmetatable({}, array_mt)
        for i = 1, n do t[i] = random_value(depth + 1) end
      else
        t = {}
        for _ = 1, n do t[random_string()] = random_value(depth + 1) end
      end
      return t
    end

    function random_value(depth)
      local r = math.random(1, depth < 5 and 10 or 7)
      if r == 1 then return math.random(math.mininteger, math.maxinteger)
      elseif r == 2 then return math.random(-1000, 1000)
      elseif r == 3 then return random_float()
      elseif r == 4 then return (math.random(-1000, 1000) + 0.0) * 2 ^ math.random(-4, 4)
      elseif r == 5 then return random_string()
      elseif r == 6 then return ({ true, false, null })[math.random(3)]
      elseif r == 7 then return math.random(2) == 1 and -0.0 or 0.0
      else return random_table(depth) end
    end

    it("round-trip exactly", function()
      math.randomseed(20240611)
      local count = 0
      for _ = 1, 3000 do
        local v = random_table(0)
        local text = encode(v)
        local back = decode(text)
        assert.is_true(same(v, back), text)
        assert.equal(text, encode(back))
        count = count + 1
      end
      assert.equal(3000, count)
    end)
  end)
end)
