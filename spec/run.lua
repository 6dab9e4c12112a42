-- Runs the busted specs (all, or the files/options given) and ends with a plain
-- "N passed, N failed" line, so that a run that executed no test is visible.
local args = {}
for i = 1, #arg do
  args[#args + 1] = "'" .. arg[i]:gsub("'", "'\\''") .. "'"
end
local cmd = "busted --lua=lua5.4 -o utfTerminal " .. table.concat(args, " ") .. " 2>&1"
local p = assert(io.popen(cmd, "r"))
local passed, failed, errors
for line in p:lines() do
  io.stdout:write(line, "\n")
  io.stdout:flush()
  local s, f, e = line:gsub("\27%[[%d;]*m", ""):match("(%d+) successes? / (%d+) failures? / (%d+) errors?")
  if s then passed, failed, errors = tonumber(s), tonumber(f), tonumber(e) end
end
local ok, _, status = p:close()
if not passed then
  print("0 passed, 1 failed")
  print("spec/run.lua: busted printed no summary (exit " .. tostring(status) .. ")")
  os.exit(1)
end
print(("%d passed, %d failed"):format(passed, failed + errors))
os.exit((ok and failed + errors == 0 and passed > 0) and 0 or 1)
