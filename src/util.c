/* Small system helpers the Lua layer needs: a monotonic clock, sleeping for
 * reconnect backoff, and random bytes for generated passwords. */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "msgbus.h"

/* core.now() -> seconds on a monotonic clock (float) */
static int util_now(lua_State *L)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
	return 1;
}

/* core.sleep(seconds) */
static int util_sleep(lua_State *L)
{
	lua_Number s = luaL_checknumber(L, 1);
	struct timespec ts;
	luaL_argcheck(L, s >= 0 && s < 86400, 1, "seconds must be between 0 and 86400");
	ts.tv_sec = (time_t)s;
	ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
	return 0;
}

/* core.random_hex(nbytes) -> 2*nbytes hex digits from the kernel's CSPRNG */
static int util_random_hex(lua_State *L)
{
	static const char digits[] = "0123456789abcdef";
	unsigned char raw[64];
	char hex[128];
	lua_Integer n = luaL_checkinteger(L, 1);
	size_t got = 0, i;
	luaL_argcheck(L, n > 0 && n <= 64, 1, "between 1 and 64 bytes");
	while (got < (size_t)n) {
		ssize_t r = getrandom(raw + got, (size_t)n - got, 0);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return luaL_error(L, "msgbus: getrandom failed: %s", strerror(errno));
		}
		got += (size_t)r;
	}
	for (i = 0; i < (size_t)n; i++) {
		hex[2 * i] = digits[raw[i] >> 4];
		hex[2 * i + 1] = digits[raw[i] & 15];
	}
	lua_pushlstring(L, hex, 2 * (size_t)n);
	return 1;
}

static const luaL_Reg util_funcs[] = {
	{"now", util_now},
	{"sleep", util_sleep},
	{"random_hex", util_random_hex},
	{NULL, NULL},
};

void util_open(lua_State *L)
{
	luaL_setfuncs(L, util_funcs, 0);
}
