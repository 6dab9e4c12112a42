/*
 * libFuzzer target for the argument handling of the C core (msgbus.core).
 *
 * Each input is a small program for a fresh lua_State with the standard libraries
 * and msgbus.core loaded: it builds Lua values of every type in 16 slots, links
 * them into tables (holes, cycles, shared parts, metatables), and calls the core's
 * functions and Conn methods with them. Every call goes through lua_pcall, so an
 * error raised by an argument check is a normal outcome; what the fuzzer looks for
 * is a crash, a sanitizer report, a leak, or a broken invariant (abort()).
 *
 * Nothing here can block: the Conn objects never reached a server (libpq started
 * them towards a socket folder that does not exist), connect is forced towards
 * the same folder, and sleep only ever sleeps for 0 seconds.
 *
 * The encoding of programs is shared with fuzz/make_corpus.lua (opcodes, value
 * kinds, the function list); change both together.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <libpq-fe.h>

int luaopen_msgbus_core(lua_State *L);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NOHOST "/nonexistent-msgbus-fuzz"

/* The harness's own walks over values are not coverage to chase, and cost most of
 * the time when instrumented. */
#if defined(__clang__)
#define NOT_COVERED __attribute__((no_sanitize("coverage")))
#else
#define NOT_COVERED
#endif

/* The stack of the main thread while a program runs. */
#define MODULE 1 /* the msgbus.core table */
#define METHODS 2 /* the __index table of msgbus.Conn */
#define CONN_MT 3 /* the metatable of msgbus.Conn */
#define SLOT0 4 /* first of the value slots */
#define NSLOTS 16

#define MAX_OPS 256
#define MAX_STRING 65536
/* What json_encode may be handed: values counted each time they are reached, and
 * string bytes. Bounds the time a subtree shared 2^n ways can take. */
#define MAX_NODES 50000
#define MAX_BYTES (16L << 20)
#define DEFAULT_DEPTH 100 /* the codec's default maxdepth */
#define WALK_DEPTH 1001 /* past what any maxdepth lets the codec reach */

/* Opcodes. */
enum { OP_MAKE, OP_SET, OP_APPEND, OP_SETI, OP_SETMT, OP_CALL, OP_JSON, OP_ROUND, OP_GC, OP_FAILALLOC, OP_CONCAT, NOPS };

/* Value kinds of OP_MAKE. */
enum {
	K_NIL, K_FALSE, K_TRUE, K_INT, K_RAWINT, K_FLOAT, K_RAWFLOAT, K_STRING, K_WORD, K_TABLE,
	K_ARRAY, K_NULL, K_LIGHTUD, K_CFUNC, K_USERDATA, K_CONN, K_CLOSEDCONN, K_ARRAYMT, K_COPY,
	K_THREAD, K_REPSTRING, K_FILLED, NKINDS
};

/* Where a function lives. */
enum { IN_MODULE, IN_METHODS, IN_META };

static const struct {
	const char *name;
	int where;
} functions[] = {
	{"json_encode", IN_MODULE}, {"json_decode", IN_MODULE}, {"conninfo_parse", IN_MODULE},
	{"connect", IN_MODULE}, {"now", IN_MODULE}, {"random_hex", IN_MODULE}, {"sleep", IN_MODULE},
	{"exec", IN_METHODS}, {"script", IN_METHODS}, {"prepare", IN_METHODS}, {"run", IN_METHODS},
	{"wait", IN_METHODS}, {"notifications", IN_METHODS}, {"socket", IN_METHODS}, {"ok", IN_METHODS},
	{"txstatus", IN_METHODS}, {"backend_pid", IN_METHODS}, {"escape_identifier", IN_METHODS},
	{"escape_literal", IN_METHODS}, {"encrypt_password", IN_METHODS}, {"close", IN_METHODS},
	{"__gc", IN_META}, {"__close", IN_META}, {"__tostring", IN_META},
};
#define NFUNCS (sizeof functions / sizeof functions[0])

static const lua_Integer special_ints[] = {
	0, 1, -1, 2, 3, 10, 63, 64, 65, 100, 101, 255, 256, 257, 999, 1000, 1001, 86399, 86400,
	65535, 65536, 0x7FFFFFFF, -0x7FFFFFFF - 1, 0x80000000, LUA_MAXINTEGER, LUA_MININTEGER,
	LUA_MAXINTEGER - 1, LUA_MININTEGER + 1, (lua_Integer)1 << 53, ((lua_Integer)1 << 53) + 1, -2, 4,
};
#define NSPECIAL_INTS (sizeof special_ints / sizeof special_ints[0])

#define W(s) {s, sizeof(s) - 1}
static const struct {
	const char *s;
	size_t n;
} words[] = {
	W(""), W("array"), W("object"), W("__jsontype"), W("a"), W("b"), W("a b"), W("1"), W("0"),
	W("-1"), W("1.5"), W("0x10"), W(" 3 "), W("1e2"), W("nan"), W("inf"), W("0.0001"), W("1000"),
	W("dbname=msgbus"), W("port=1"), W("user='a b' options='-c x=1'"), W("dbname='unterminated"),
	W("postgresql://u:p@%2Ftmp:1/db?application_name=x"), W("postgres://"), W("postgresql://[::1"),
	W("application_name"), W("dbname"), W("host"), W("port"), W("user"), W("password"),
	W("select $1::int"), W("$1"), W("a\"b"), W("a'b"), W("a\\b"), W("x\0y"), W("\0"),
	W("\xc3\xa9"), W("\xed\xa0\x80"), W("\xf4\x90\x80\x80"), W("\xc0\x80"), W("\xff"), W("\x80"),
	W("\xf0\x9f\x98\x80"), W("\x7f"), W("\x1f"), W("[1,2,3]"), W("{\"a\":1}"), W("\"\\ud83d\\ude00\""),
	W("\"\\ud800\""), W("1e400"), W("-0.0"), W("-9223372036854775808"), W("9223372036854775808"),
	W("null"), W("true"), W("[]"), W("{}"), W("scram-sha-256"), W("md5"), W("k"), W("v"),
};
#define NWORDS (sizeof words / sizeof words[0])

/* ------------------------------------------------------------ input */

typedef struct {
	const uint8_t *p;
	size_t n;
} In;

static unsigned in_byte(In *in)
{
	if (in->n == 0)
		return 0;
	in->n--;
	return *in->p++;
}

static unsigned in_u16(In *in)
{
	unsigned lo = in_byte(in);
	return lo | in_byte(in) << 8;
}

static uint64_t in_u64(In *in)
{
	uint64_t v = 0;
	int i;
	for (i = 0; i < 8; i++)
		v |= (uint64_t)in_byte(in) << (8 * i);
	return v;
}

/* Up to want bytes of the input, as they are. */
static const char *in_bytes(In *in, size_t want, size_t *got)
{
	const char *s = (const char *)in->p;
	if (want > in->n)
		want = in->n;
	in->p += want;
	in->n -= want;
	*got = want;
	return s;
}

static int in_slot(In *in)
{
	return SLOT0 + (int)(in_byte(in) % NSLOTS);
}

/* ------------------------------------------------------------ memory */

/* Lua's allocator: a 256 MB cap, and on request every growth failing after the
 * first `countdown` of one call, so that memory errors hit the core at any point. */
typedef struct {
	size_t used, limit;
	long countdown; /* < 0: not failing */
} Heap;

static void *heap_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	Heap *h = ud;
	size_t old = ptr ? osize : 0;
	void *p;
	if (nsize == 0) {
		free(ptr);
		h->used -= old;
		return NULL;
	}
	if (nsize > old) { /* Lua relies on shrinking never failing */
		if (nsize - old > h->limit - h->used)
			return NULL;
		if (h->countdown == 0)
			return NULL;
		if (h->countdown > 0)
			h->countdown--;
	}
	p = realloc(ptr, nsize);
	if (p == NULL)
		return NULL;
	h->used = h->used - old + nsize;
	return p;
}

/* Makes every allocation fail after the next `countdown` (if >= 0) until disarm().
 * The collector stays stopped meanwhile: a finalizer that cannot be called for
 * want of memory is never called again (Lua's rule, true of every __gc), which
 * would show as a leak of whatever it was to free, a PGconn here. */
static void arm(lua_State *L, Heap *h, long countdown)
{
	if (countdown >= 0)
		lua_gc(L, LUA_GCSTOP);
	h->countdown = countdown;
}

static void disarm(lua_State *L, Heap *h, long countdown)
{
	h->countdown = -1;
	if (countdown >= 0)
		lua_gc(L, LUA_GCRESTART);
}

/* ------------------------------------------------------------ failures */

/* CORE_FUZZ_TRACE=1 prints every call and its outcome (to check what a given input
 * reaches: core_fuzz file...). Set once at start-up. */
static int trace;

/* The value at idx for a trace line, without calling any metamethod. */
static void trace_value(lua_State *L, int idx)
{
	size_t n;
	switch (lua_type(L, idx)) {
	case LUA_TSTRING: {
		const char *s = lua_tolstring(L, idx, &n);
		fprintf(stderr, " \"%.*s\"%s", (int)(n > 120 ? 120 : n), s, n > 120 ? "..." : "");
		break;
	}
	case LUA_TNUMBER:
		if (lua_isinteger(L, idx))
			fprintf(stderr, " %lld", (long long)lua_tointeger(L, idx));
		else
			fprintf(stderr, " %.17g", (double)lua_tonumber(L, idx));
		break;
	case LUA_TBOOLEAN:
		fprintf(stderr, " %s", lua_toboolean(L, idx) ? "true" : "false");
		break;
	default:
		fprintf(stderr, " %s", luaL_typename(L, idx));
	}
}

static void invariant(int ok, const char *what, lua_State *L, int idx)
{
	if (ok)
		return;
	fprintf(stderr, "core_fuzz: invariant broken: %s", what);
	if (idx != 0) {
		size_t n;
		const char *s = luaL_tolstring(L, idx, &n);
		fprintf(stderr, " (value: %.*s)", (int)(n > 300 ? 300 : n), s);
	}
	fputc('\n', stderr);
	abort();
}

/* ------------------------------------------------------------ walks */

typedef struct {
	long nodes, bytes;
	int maxdepth; /* tables deeper than this are not looked into (the encoder stops) */
	int weak; /* a table with __mode: the GC may empty parts of it at any time */
	int nonfinite;
} Walk;

NOT_COVERED static int walk_over(const Walk *w)
{
	return w->nodes > MAX_NODES || w->bytes > MAX_BYTES;
}

/* Sizes up the value at idx as the encoder would go through it. */
NOT_COVERED static void walk(lua_State *L, int idx, int depth, Walk *w)
{
	w->nodes++;
	if (walk_over(w))
		return;
	switch (lua_type(L, idx)) {
	case LUA_TSTRING:
		w->bytes += (long)lua_rawlen(L, idx);
		break;
	case LUA_TNUMBER:
		if (!lua_isinteger(L, idx) && !isfinite(lua_tonumber(L, idx)))
			w->nonfinite = 1;
		break;
	case LUA_TTABLE:
		if (lua_getmetatable(L, idx)) {
			lua_pushliteral(L, "__mode");
			if (lua_rawget(L, -2) != LUA_TNIL)
				w->weak = 1;
			lua_pop(L, 2);
		}
		if (depth >= w->maxdepth)
			break;
		luaL_checkstack(L, 4, "core_fuzz: walk");
		lua_pushnil(L);
		while (lua_next(L, idx)) {
			walk(L, lua_gettop(L) - 1, depth + 1, w);
			walk(L, lua_gettop(L), depth + 1, w);
			lua_pop(L, 1);
			if (walk_over(w)) {
				lua_pop(L, 1);
				break;
			}
		}
		break;
	default:
		break;
	}
}

/* Whether the arguments a..a+n-1 are small enough to hand to an encoder that
 * stops at maxdepth. */
static int args_bounded(lua_State *L, int a, int n, int maxdepth, int *weak)
{
	Walk w = {0, 0, 0, 0, 0};
	int i;
	w.maxdepth = maxdepth;
	for (i = 0; i < n && !walk_over(&w); i++)
		walk(L, a + i, 0, &w);
	*weak = w.weak;
	return !walk_over(&w);
}

/* The maxdepth json_encode will use given its arguments a..a+n-1 (0 when it is to
 * raise for a bad one, before encoding anything). */
static int encode_depth(lua_State *L, int a, int n)
{
	int isint;
	lua_Integer d;
	if (n < 2 || lua_isnil(L, a + 1))
		return DEFAULT_DEPTH;
	d = lua_tointegerx(L, a + 1, &isint);
	return isint && d >= 0 && d <= 1000 ? (int)d : 0;
}

/* Equal as JSON values: same types, integer or float, float bits, string bytes;
 * tables with the same keys and equal values (array marks are not compared). */
NOT_COVERED static int same(lua_State *L, int a, int b, int depth)
{
	int t = lua_type(L, a), ok = 1;
	if (t != lua_type(L, b))
		return 0;
	switch (t) {
	case LUA_TNUMBER:
		if (lua_isinteger(L, a) != lua_isinteger(L, b))
			return 0;
		if (lua_isinteger(L, a))
			return lua_tointeger(L, a) == lua_tointeger(L, b);
		else {
			lua_Number x = lua_tonumber(L, a), y = lua_tonumber(L, b);
			return memcmp(&x, &y, sizeof x) == 0;
		}
	case LUA_TSTRING: {
		size_t n, m;
		const char *s = lua_tolstring(L, a, &n), *r = lua_tolstring(L, b, &m);
		return n == m && memcmp(s, r, n) == 0;
	}
	case LUA_TTABLE: {
		lua_Integer na = 0, nb = 0;
		invariant(depth <= WALK_DEPTH, "encoded value nested deeper than any maxdepth", NULL, 0);
		luaL_checkstack(L, 6, "core_fuzz: same");
		lua_pushnil(L);
		while (ok && lua_next(L, a)) {
			na++;
			lua_pushvalue(L, -2);
			lua_rawget(L, b);
			ok = same(L, lua_gettop(L) - 1, lua_gettop(L), depth + 1);
			lua_pop(L, 2);
		}
		if (!ok) {
			lua_pop(L, 1);
			return 0;
		}
		lua_pushnil(L);
		while (lua_next(L, b)) {
			nb++;
			lua_pop(L, 1);
		}
		return na == nb;
	}
	default:
		return lua_rawequal(L, a, b);
	}
}

/* ------------------------------------------------------------ values */

static void push_conn(lua_State *L, int started)
{
	/* Mirrors the userdata of msgbus.Conn in src/conn.c: the PGconn, NULL once closed. */
	PGconn **c = lua_newuserdatauv(L, sizeof *c, 0);
	*c = NULL;
	lua_pushvalue(L, CONN_MT);
	lua_setmetatable(L, -2);
	if (started) {
		static const char *const keys[] = {"host", "dbname", "connect_timeout", NULL};
		static const char *const vals[] = {NOHOST, "msgbus_fuzz", "1", NULL};
		*c = PQconnectStartParams(keys, vals, 0);
		invariant(*c != NULL && PQstatus(*c) == CONNECTION_BAD, "libpq connected to " NOHOST, NULL, 0);
	}
}

static void push_value(lua_State *L, In *in, unsigned kind)
{
	switch (kind) {
	case K_NIL:
		lua_pushnil(L);
		break;
	case K_FALSE:
	case K_TRUE:
		lua_pushboolean(L, kind == K_TRUE);
		break;
	case K_INT:
		lua_pushinteger(L, special_ints[in_byte(in) % NSPECIAL_INTS]);
		break;
	case K_RAWINT:
		lua_pushinteger(L, (lua_Integer)in_u64(in));
		break;
	case K_FLOAT: {
		static const double f[] = {0.0, -0.0, 0.5, 1.0, -1.0, 0.1, 1e-300, 5e-324, 2.2250738585072014e-308,
		                           1.7976931348623157e308, -1.7976931348623157e308, 9007199254740992.0,
		                           9223372036854775808.0, -9223372036854775808.0, 1e15, 1e16, 1e17, 1e21,
		                           123456.789, 3.0, 100.0, 1000.0, 86399.999, 86400.0, 1e-7, 0.0005};
		unsigned b = in_byte(in);
		if (b % 32 == 26)
			lua_pushnumber(L, NAN);
		else if (b % 32 == 27)
			lua_pushnumber(L, -NAN);
		else if (b % 32 == 28)
			lua_pushnumber(L, INFINITY);
		else if (b % 32 == 29)
			lua_pushnumber(L, -INFINITY);
		else
			lua_pushnumber(L, f[b % 32 % 26]);
		break;
	}
	case K_RAWFLOAT: {
		uint64_t bits = in_u64(in);
		double d;
		memcpy(&d, &bits, sizeof d);
		lua_pushnumber(L, d);
		break;
	}
	case K_STRING: {
		size_t n;
		const char *s = in_bytes(in, in_byte(in), &n);
		lua_pushlstring(L, s, n);
		break;
	}
	case K_WORD: {
		unsigned i = in_byte(in) % NWORDS;
		lua_pushlstring(L, words[i].s, words[i].n);
		break;
	}
	case K_TABLE:
		lua_newtable(L);
		break;
	case K_ARRAY:
		lua_newtable(L);
		lua_getfield(L, MODULE, "json_array_mt");
		lua_setmetatable(L, -2);
		break;
	case K_NULL:
		lua_getfield(L, MODULE, "json_null");
		break;
	case K_LIGHTUD:
		lua_pushlightuserdata(L, (void *)&special_ints[in_byte(in) % NSPECIAL_INTS]);
		break;
	case K_CFUNC:
		lua_getfield(L, MODULE, functions[in_byte(in) % 7].name);
		break;
	case K_USERDATA:
		lua_newuserdatauv(L, in_byte(in) % 16, 1);
		break;
	case K_CONN:
	case K_CLOSEDCONN:
		push_conn(L, kind == K_CONN);
		break;
	case K_ARRAYMT:
		lua_getfield(L, MODULE, "json_array_mt");
		break;
	case K_COPY:
		lua_pushvalue(L, in_slot(in));
		break;
	case K_THREAD:
		lua_newthread(L);
		break;
	case K_REPSTRING: {
		luaL_Buffer b;
		unsigned c = in_byte(in);
		size_t n = in_u16(in), i;
		char *p = luaL_buffinitsize(L, &b, n);
		for (i = 0; i < n; i++)
			p[i] = (char)c;
		luaL_pushresultsize(&b, n);
		break;
	}
	case K_FILLED: { /* n entries at once: keys 1..n or "k1".."kn", values fresh tables or integers */
		unsigned n = in_byte(in) % 64, shape = in_byte(in), i;
		lua_createtable(L, shape & 1 ? (int)n : 0, shape & 1 ? 0 : (int)n);
		for (i = 1; i <= n; i++) {
			if (shape & 1)
				lua_pushinteger(L, i);
			else
				lua_pushfstring(L, "k%d", (int)i);
			if (shape & 2)
				lua_newtable(L);
			else
				lua_pushinteger(L, i);
			lua_rawset(L, -3);
		}
		break;
	}
	default:
		lua_pushnil(L);
	}
}

static void op_make(lua_State *L, In *in)
{
	int dst = in_slot(in);
	push_value(L, in, in_byte(in) % NKINDS);
	lua_replace(L, dst);
}

/* t[k] = v, raw, when that is something Lua allows. */
static void op_set(lua_State *L, int t, int k, int v)
{
	if (!lua_istable(L, t) || lua_isnil(L, k))
		return;
	if (lua_type(L, k) == LUA_TNUMBER && !lua_isinteger(L, k) && isnan(lua_tonumber(L, k)))
		return;
	lua_pushvalue(L, k);
	lua_pushvalue(L, v);
	lua_rawset(L, t);
}

static void op_setmt(lua_State *L, In *in)
{
	int t = in_slot(in);
	unsigned mode = in_byte(in) % 8;
	int v = in_slot(in);
	if (!lua_istable(L, t))
		return;
	switch (mode) {
	case 0:
		lua_pushnil(L);
		break;
	case 1:
		lua_getfield(L, MODULE, "json_array_mt");
		break;
	case 2: /* __jsontype = any value */
		lua_createtable(L, 0, 1);
		lua_pushvalue(L, v);
		lua_setfield(L, -2, "__jsontype");
		break;
	case 3:
	case 4:
	case 5:
		lua_createtable(L, 0, 2);
		lua_pushstring(L, mode == 3 ? "v" : mode == 4 ? "k" : "kv");
		lua_setfield(L, -2, "__mode");
		if (mode != 4) {
			lua_pushstring(L, mode == 3 ? "object" : "array");
			lua_setfield(L, -2, "__jsontype");
		}
		break;
	case 6: /* the table itself (a metatable of its own) */
		lua_pushvalue(L, t);
		break;
	default: /* any table found in a slot */
		if (!lua_istable(L, v))
			return;
		lua_pushvalue(L, v);
	}
	lua_setmetatable(L, t);
}

static void op_concat(lua_State *L, In *in)
{
	int dst = in_slot(in), a = in_slot(in), b = in_slot(in);
	unsigned rep = in_byte(in) % 16 + 1, i;
	size_t n, m;
	const char *s, *r;
	luaL_Buffer buf;
	if (lua_type(L, a) != LUA_TSTRING || lua_type(L, b) != LUA_TSTRING)
		return;
	s = lua_tolstring(L, a, &n);
	r = lua_tolstring(L, b, &m);
	if ((n + m) * rep > MAX_STRING)
		return;
	luaL_buffinit(L, &buf);
	for (i = 0; i < rep; i++) {
		luaL_addlstring(&buf, s, n);
		luaL_addlstring(&buf, r, m);
	}
	luaL_pushresult(&buf);
	lua_replace(L, dst);
}

static void op_gc(lua_State *L, In *in)
{
	switch (in_byte(in) % 6) {
	case 0:
		lua_gc(L, LUA_GCCOLLECT);
		break;
	case 1: /* a new cycle at once and big steps: collections land inside the core's calls */
		lua_gc(L, LUA_GCINC, 1, 1000, 6);
		break;
	case 2:
		lua_gc(L, LUA_GCGEN, 1, 10);
		break;
	case 3:
		lua_gc(L, LUA_GCSTEP, 0);
		break;
	case 4:
		lua_gc(L, LUA_GCINC, 200, 100, 13); /* Lua's defaults */
		break;
	default:
		lua_gc(L, LUA_GCSTOP);
		lua_gc(L, LUA_GCRESTART);
	}
}

/* ------------------------------------------------------------ checks of results */

/* decode(text[, md]) must give back value, and encoding that again the same text. */
static void check_roundtrip(lua_State *L, int text, int value, int md)
{
	int top = lua_gettop(L), st;
	lua_getfield(L, MODULE, "json_decode");
	lua_pushvalue(L, text);
	if (md)
		lua_pushvalue(L, md);
	st = lua_pcall(L, md ? 2 : 1, 1, 0);
	if (st == LUA_ERRMEM)
		goto done;
	invariant(st == LUA_OK, "json_decode rejects what json_encode made", L, -1);
	invariant(same(L, value, top + 1, 0), "json_decode(json_encode(x)) differs from x", L, text);
	lua_getfield(L, MODULE, "json_encode");
	lua_pushvalue(L, top + 1);
	if (md)
		lua_pushvalue(L, md);
	st = lua_pcall(L, md ? 2 : 1, 1, 0);
	if (st == LUA_ERRMEM)
		goto done;
	invariant(st == LUA_OK, "json_encode rejects what json_decode made of its own text", L, -1);
	invariant(lua_rawequal(L, -1, text), "json_encode(json_decode(s)) differs from s", L, text);
done:
	lua_settop(L, top);
}

/* A value json_decode made: unless it holds an out-of-range number (decoded as
 * ±inf, which JSON cannot carry back), it must encode and round-trip. */
static void check_decoded(lua_State *L, int value, int md)
{
	int top = lua_gettop(L), st;
	Walk w = {0, 0, WALK_DEPTH, 0, 0};
	walk(L, value, 0, &w);
	if (w.nonfinite || walk_over(&w))
		return;
	lua_getfield(L, MODULE, "json_encode");
	lua_pushvalue(L, value);
	if (md)
		lua_pushvalue(L, md);
	st = lua_pcall(L, md ? 2 : 1, 1, 0);
	if (st != LUA_ERRMEM) {
		invariant(st == LUA_OK, "json_encode rejects what json_decode made", L, -1);
		check_roundtrip(L, top + 1, value, md);
	}
	lua_settop(L, top);
}

/* What PQescapeLiteral/PQescapeIdentifier give for s, up to its first NUL, in
 * the SQL_ASCII encoding of a connection that never reached a server. */
static void push_expected_escape(lua_State *L, const char *s, size_t n, int ident)
{
	luaL_Buffer b;
	char q = ident ? '"' : '\'';
	size_t i;
	int backslash = 0;
	n = strnlen(s, n);
	if (!ident && memchr(s, '\\', n) != NULL)
		backslash = 1;
	luaL_buffinit(L, &b);
	if (backslash)
		luaL_addstring(&b, " E");
	luaL_addchar(&b, q);
	for (i = 0; i < n; i++) {
		if (s[i] == q || (!ident && s[i] == '\\'))
			luaL_addchar(&b, s[i]);
		luaL_addchar(&b, s[i]);
	}
	luaL_addchar(&b, q);
	luaL_pushresult(&b);
}

/* Checks of one call's outcome: fn was called with args a..a+nargs-1 and gave
 * status and the nres values on top of the stack. */
static void check_call(lua_State *L, const char *fn, int a, int nargs, int status, int nres, int bounded)
{
	int r = lua_gettop(L) - nres + 1; /* first result */
	if (status != LUA_OK) {
		invariant(lua_type(L, -1) == LUA_TSTRING, "an error that is not a string", L, -1);
		return;
	}
	if (nres >= 2 && lua_isnil(L, r)) { /* the fail tuple: nil, "msgbus: ...", code */
		size_t n;
		const char *msg = lua_tolstring(L, r + 1, &n);
		invariant(lua_type(L, r + 1) == LUA_TSTRING && n > 8 && memcmp(msg, "msgbus: ", 8) == 0,
		          "a fail tuple whose message is not a string starting 'msgbus: '", L, r + 1);
		invariant(nres == 3 && lua_type(L, r + 2) == LUA_TSTRING, "a fail tuple without a code", L, 0);
		return;
	}
	if (strcmp(fn, "json_encode") == 0) {
		invariant(nres == 1 && lua_type(L, r) == LUA_TSTRING, "json_encode returned no string", L, 0);
		if (bounded)
			check_roundtrip(L, r, a, nargs >= 2 ? a + 1 : 0);
	} else if (strcmp(fn, "json_decode") == 0) {
		invariant(nres == 1, "json_decode returned other than one value", L, 0);
		if (lua_type(L, a) == LUA_TSTRING)
			check_decoded(L, r, nargs >= 2 ? a + 1 : 0);
	} else if (strcmp(fn, "random_hex") == 0) {
		size_t n, i;
		const char *s = lua_tolstring(L, r, &n);
		lua_Integer want = lua_tointegerx(L, a, NULL);
		invariant(s != NULL && (lua_Integer)n == 2 * want, "random_hex gave a wrong length", L, r);
		for (i = 0; i < n; i++)
			invariant((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'),
			          "random_hex gave a non-hex digit", L, r);
	} else if (strcmp(fn, "escape_identifier") == 0 || strcmp(fn, "escape_literal") == 0) {
		if (lua_type(L, a + 1) == LUA_TSTRING) {
			size_t n;
			const char *s = lua_tolstring(L, a + 1, &n);
			push_expected_escape(L, s, n, fn[7] == 'i');
			invariant(lua_rawequal(L, -1, r), "escaped text is not what libpq gives", L, r);
			lua_pop(L, 1);
		}
	} else if (strcmp(fn, "__tostring") == 0) {
		size_t n;
		const char *s = lua_tolstring(L, r, &n);
		invariant(s != NULL && n > 13 && memcmp(s, "msgbus.Conn (", 13) == 0, "__tostring of a Conn", L, r);
	} else if (strcmp(fn, "conninfo_parse") == 0) {
		invariant(lua_istable(L, r), "conninfo_parse returned no table", L, r);
		lua_pushnil(L);
		while (lua_next(L, r)) {
			invariant(lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING,
			          "conninfo_parse gave a non-string keyword or value", L, -1);
			lua_pop(L, 1);
		}
	} else if (strcmp(fn, "ok") == 0) {
		invariant(lua_isboolean(L, r) && !lua_toboolean(L, r), "a Conn that never connected is ok", L, r);
	}
}

/* ------------------------------------------------------------ calls */

/* connect must never leave this machine nor wait: a conninfo naming a host address,
 * a service or a password file is not tried; the options table (copied, so that a
 * table in a slot is left alone) always sends it to a socket folder that does not
 * exist. Returns 0 when the call is not to be made. */
static int guard_connect(lua_State *L, int a, int *nargs)
{
	static const char *const banned[] = {"hostaddr", "service", "passfile", NULL};
	const char *info = lua_tostring(L, a);
	int i;
	if (info != NULL) {
		PQconninfoOption *opts = PQconninfoParse(info, NULL), *o;
		int bad = 0;
		for (o = opts; o != NULL && o->keyword != NULL; o++)
			for (i = 0; banned[i] != NULL; i++)
				if (o->val != NULL && strcmp(o->keyword, banned[i]) == 0)
					bad = 1;
		PQconninfoFree(opts);
		if (bad)
			return 0;
	}
	if (*nargs < 2) {
		lua_settop(L, a);
		lua_pushnil(L);
		*nargs = 2;
	}
	if (lua_isnil(L, a + 1)) {
		lua_newtable(L);
		lua_replace(L, a + 1);
	}
	if (!lua_istable(L, a + 1))
		return 1; /* connect raises before trying */
	lua_newtable(L);
	lua_pushnil(L);
	while (lua_next(L, a + 1)) {
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, -4);
	}
	for (i = 0; banned[i] != NULL; i++) {
		lua_pushnil(L);
		lua_setfield(L, -2, banned[i]);
	}
	lua_pushliteral(L, NOHOST);
	lua_setfield(L, -2, "host");
	lua_pushliteral(L, "1");
	lua_setfield(L, -2, "connect_timeout");
	lua_replace(L, a + 1);
	return 1;
}

/* CALL fn argc args... dst: argc 0..7 slots, or (argc >= 240) a slot followed by
 * 250 or more copies of another (past the 256 parameters of exec and run). */
static void op_call(lua_State *L, In *in, Heap *h, long *failalloc)
{
	unsigned f = in_byte(in) % NFUNCS, argc = in_byte(in);
	const char *fn = functions[f].name;
	int a, nargs, i, top, st, nres, bounded, weak;
	top = lua_gettop(L);
	a = top + 1;
	if (argc < 240) {
		nargs = (int)(argc % 8);
		luaL_checkstack(L, nargs + 20, "core_fuzz");
		for (i = 0; i < nargs; i++)
			lua_pushvalue(L, in_slot(in));
	} else {
		int first = in_slot(in), fill = in_slot(in);
		nargs = 1 + 250 + (int)(argc - 240);
		luaL_checkstack(L, 2 * nargs + 20, "core_fuzz");
		lua_pushvalue(L, first);
		for (i = 1; i < nargs; i++)
			lua_pushvalue(L, fill);
	}
	bounded = 1;
	weak = 0;
	if (strcmp(fn, "json_encode") == 0)
		bounded = args_bounded(L, a, nargs, encode_depth(L, a, nargs), &weak);
	else if (strcmp(fn, "exec") == 0 || strcmp(fn, "run") == 0) /* tables are sent as JSON */
		bounded = args_bounded(L, a, nargs, DEFAULT_DEPTH, &weak);
	if (!bounded)
		goto done; /* would only take long */
	if (strcmp(fn, "sleep") == 0 && nargs >= 1) {
		int isnum;
		lua_Number s = lua_tonumberx(L, a, &isnum);
		if (isnum && s > 0 && s < 86400) {
			lua_pushnumber(L, 0.0);
			lua_replace(L, a);
		}
	}
	if (strcmp(fn, "connect") == 0 && !guard_connect(L, a, &nargs))
		goto done;
	if (functions[f].where == IN_MODULE)
		lua_getfield(L, MODULE, fn);
	else
		lua_getfield(L, functions[f].where == IN_METHODS ? METHODS : CONN_MT, fn);
	for (i = 0; i < nargs; i++)
		lua_pushvalue(L, a + i);
	arm(L, h, *failalloc);
	st = lua_pcall(L, nargs, LUA_MULTRET, 0);
	disarm(L, h, *failalloc);
	nres = lua_gettop(L) - (a + nargs - 1);
	if (trace) {
		fprintf(stderr, "%s(", fn);
		for (i = 0; i < nargs && i < 8; i++)
			trace_value(L, a + i);
		fprintf(stderr, " )%s ->", *failalloc >= 0 ? " [failing allocations]" : "");
		for (i = 0; i < nres; i++)
			trace_value(L, a + nargs + i);
		fputc('\n', stderr);
	}
	if (*failalloc >= 0) { /* results made under failing allocations are not checked */
		*failalloc = -1;
		goto keep;
	}
	check_call(L, fn, a, nargs, st, nres, bounded && !weak);
keep:
	if (nres > 0)
		lua_pushvalue(L, a + nargs); /* the first result, or the error */
	else
		lua_pushnil(L);
	lua_replace(L, in_slot(in));
done:
	lua_settop(L, top);
}

/* JSON len16 bytes opt dst: json_decode of raw bytes; opt 0 = no maxdepth, 1 = a
 * slot's value, else opt - 2. */
static void op_json(lua_State *L, In *in, Heap *h, long *failalloc)
{
	size_t n;
	const char *s = in_bytes(in, in_u16(in), &n);
	unsigned opt = in_byte(in);
	int top = lua_gettop(L), st, md = 0;
	lua_pushlstring(L, s, n);
	if (opt == 1) {
		lua_pushvalue(L, in_slot(in));
		md = top + 2;
	} else if (opt > 1) {
		lua_pushinteger(L, (lua_Integer)opt - 2);
		md = top + 2;
	}
	lua_getfield(L, MODULE, "json_decode");
	lua_pushvalue(L, top + 1);
	if (md)
		lua_pushvalue(L, md);
	arm(L, h, *failalloc);
	st = lua_pcall(L, md ? 2 : 1, 1, 0);
	disarm(L, h, *failalloc);
	if (trace) {
		fprintf(stderr, "json_decode(");
		trace_value(L, top + 1);
		fprintf(stderr, " )%s ->", *failalloc >= 0 ? " [failing allocations]" : "");
		trace_value(L, -1);
		fputc('\n', stderr);
	}
	if (*failalloc < 0)
		check_call(L, "json_decode", top + 1, md ? 2 : 1, st, 1, 1);
	*failalloc = -1;
	lua_replace(L, in_slot(in));
	lua_settop(L, top);
}

/* ROUND slot opt: json_encode of a slot, then the round-trip checks. */
static void op_round(lua_State *L, In *in)
{
	int v = in_slot(in), top = lua_gettop(L), md = 0, st, weak;
	unsigned opt = in_byte(in);
	lua_pushvalue(L, v);
	if (opt > 0) {
		lua_pushinteger(L, (lua_Integer)opt - 1);
		md = top + 2;
	}
	if (!args_bounded(L, top + 1, 1, md ? encode_depth(L, top + 1, 2) : DEFAULT_DEPTH, &weak))
		goto done;
	lua_getfield(L, MODULE, "json_encode");
	lua_pushvalue(L, top + 1);
	if (md)
		lua_pushvalue(L, md);
	st = lua_pcall(L, md ? 2 : 1, 1, 0);
	check_call(L, "json_encode", top + 1, md ? 2 : 1, st, 1, !weak);
done:
	lua_settop(L, top);
}

/* ------------------------------------------------------------ driver */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char **e;
	(void)argc;
	(void)argv;
	/* No PG* variable may point libpq anywhere (a host, a service file). */
	for (;;) {
		char name[256];
		size_t n;
		for (e = environ; *e != NULL; e++)
			if (strncmp(*e, "PG", 2) == 0)
				break;
		if (*e == NULL)
			break;
		n = strcspn(*e, "=");
		if (n >= sizeof name)
			n = sizeof name - 1;
		memcpy(name, *e, n);
		name[n] = '\0';
		if (unsetenv(name) != 0)
			abort();
	}
	setenv("PGSYSCONFDIR", NOHOST, 1);
	trace = getenv("CORE_FUZZ_TRACE") != NULL;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	Heap heap = {0, (size_t)256 << 20, -1};
	In in = {data, size};
	long failalloc = -1;
	int ops;
	lua_State *L = lua_newstate(heap_alloc, &heap);
	if (L == NULL)
		abort();
	luaL_openlibs(L);
	luaL_requiref(L, "msgbus.core", luaopen_msgbus_core, 0);
	luaL_getmetatable(L, "msgbus.Conn");
	lua_getfield(L, -1, "__index");
	lua_insert(L, -2);
	lua_settop(L, SLOT0 + NSLOTS - 1);

	for (ops = 0; ops < MAX_OPS && in.n > 0; ops++) {
		switch (in_byte(&in) % NOPS) {
		case OP_MAKE:
			op_make(L, &in);
			break;
		case OP_SET: {
			int t = in_slot(&in), k = in_slot(&in), v = in_slot(&in);
			op_set(L, t, k, v);
			break;
		}
		case OP_APPEND: {
			int t = in_slot(&in), v = in_slot(&in);
			if (lua_istable(L, t)) {
				lua_pushvalue(L, v);
				lua_rawseti(L, t, (lua_Integer)lua_rawlen(L, t) + 1);
			}
			break;
		}
		case OP_SETI: {
			int t = in_slot(&in);
			lua_Integer i = special_ints[in_byte(&in) % NSPECIAL_INTS];
			int v = in_slot(&in);
			if (lua_istable(L, t)) {
				lua_pushvalue(L, v);
				lua_rawseti(L, t, i);
			}
			break;
		}
		case OP_SETMT:
			op_setmt(L, &in);
			break;
		case OP_CALL:
			op_call(L, &in, &heap, &failalloc);
			break;
		case OP_JSON:
			op_json(L, &in, &heap, &failalloc);
			break;
		case OP_ROUND:
			op_round(L, &in);
			break;
		case OP_GC:
			op_gc(L, &in);
			break;
		case OP_FAILALLOC:
			failalloc = (long)in_u16(&in) % 2048;
			break;
		case OP_CONCAT:
			op_concat(L, &in);
			break;
		}
		invariant(lua_gettop(L) == SLOT0 + NSLOTS - 1, "the harness lost track of its stack", NULL, 0);
	}
	lua_close(L);
	return 0;
}
