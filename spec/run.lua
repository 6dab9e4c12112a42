-- Runs the busted specs (all, or the files/options given) and ends with a plain
-- "N passed, N failed" line, so that a run that executed no test is visible.
local args = {}
for i = 1, #arg do
  args[#args + 1] = "'" .. arg[i]:gsub("'", "'\\''") .. "'"
end
-- Clusters the specs start live under one folder, removed at the end even when a
-- spec crashed before it could stop them.
local dir = io.popen("mktemp -d"):read("l")
os.execute("chmod 755 '" .. dir .. "'")
-- MSGBUS_RUNNER runs busted another way, e.g. under valgrind (see the Makefile).
-- busted itself runs under lua5.4 directly: with --lua it would start itself again
-- with the arguments joined unquoted, so a --filter with spaces became file names.
local runner = os.getenv("MSGBUS_RUNNER") or "lua5.4 /usr/bin/busted"
local cmd = ("MSGBUS_TEST_DIR='%s' %s -o utfTerminal %s 2>&1"):format(dir, runner, table.concat(args, " "))
local p = assert(io.popen(cmd, "r"))
local passed, failed, errors
for line in p:lines() do
  io.stdout:write(line, "\n")
  io.stdout:flush()
  local s, f, e = line:gsub("\27%[[%d;]*m", ""):match("(%d+) success%a* / (%d+) failures? / (%d+) errors?")
  if s then passed, failed, errors = tonumber(s), tonumber(f), tonumber(e) end
end
local ok, _, status = p:close()
os.execute(([[for pid in '%s'/*/data/postmaster.pid; do
  [ -f "$pid" ] && kill -9 "$(head -n 1 "$pid")" 2>/dev/null; done; rm -rf '%s']]):format(dir, dir))
if not passed then
  print("0 passed, 1 failed")
  print("spec/run.lua: busted printed no summary (exit " .. tostring(status) .. ")")
  os.exit(1)
end
print(("%d passed, %d failed"):format(passed, failed + errors))
os.exit((ok and failed + errors == 0 and passed > 0) and 0 or 1)
