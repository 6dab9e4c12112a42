/*
 * msgbus.Conn: one libpq connection.
 *
 * The Lua layer builds the bus on top of this: queries with parameters, prepared
 * statements for the hot path, and a wait on the socket for notifications with a
 * deadline. Failures that depend on the server return the fail tuple
 * (nil, "msgbus: ...", code), code being the SQLSTATE or "closed".
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "msgbus.h"

#define CONN_MT "msgbus.Conn"

/* Type OIDs from pg_type.h, stable across server versions. */
#define OID_BOOL 16
#define OID_INT8 20
#define OID_INT2 21
#define OID_INT4 23
#define OID_JSON 114
#define OID_FLOAT4 700
#define OID_FLOAT8 701
#define OID_JSONB 3802

/* Upvalues of every method: 1 = json_encode, 2 = json_decode. */
#define UV_ENCODE lua_upvalueindex(1)
#define UV_DECODE lua_upvalueindex(2)

#define MAX_PARAMS 256

typedef struct {
	PGconn *pg;
} Conn;

static Conn *conn_check(lua_State *L, int idx)
{
	Conn *c = luaL_checkudata(L, idx, CONN_MT);
	if (c->pg == NULL)
		luaL_error(L, "msgbus: connection is closed");
	return c;
}

static double conn_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Timeout argument: nil means forever (-1), otherwise a non-negative number. */
static double conn_opttimeout(lua_State *L, int idx)
{
	double t;
	if (lua_isnoneornil(L, idx))
		return -1.0;
	t = luaL_checknumber(L, idx);
	luaL_argcheck(L, t >= 0.0 && t == t, idx, "timeout must be a non-negative number");
	return t;
}

/* Push the fail tuple with libpq's text, trimmed of its trailing newline. */
static int conn_fail(lua_State *L, const char *msg, const char *code)
{
	size_t n = strlen(msg);
	while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
		n--;
	luaL_pushfail(L);
	lua_pushliteral(L, "msgbus: ");
	lua_pushlstring(L, msg, n);
	lua_concat(L, 2);
	lua_pushstring(L, code);
	return 3;
}

static int conn_fail_conn(lua_State *L, Conn *c)
{
	const char *code = PQstatus(c->pg) == CONNECTION_BAD ? "closed" : "connection";
	return conn_fail(L, PQerrorMessage(c->pg), code);
}

static int conn_fail_result(lua_State *L, Conn *c, PGresult *res)
{
	const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	const char *msg = res ? PQresultErrorMessage(res) : "";
	/* copied out before PQclear, since pushing them could raise (out of memory) and
	 * leak the result; a longer message is cut, SQLSTATEs are 5 characters */
	char text[8192], code[8];
	if (msg == NULL || *msg == '\0')
		msg = PQerrorMessage(c->pg);
	snprintf(text, sizeof text, "%s", msg);
	snprintf(code, sizeof code, "%s", state ? state : (PQstatus(c->pg) == CONNECTION_BAD ? "closed" : "connection"));
	PQclear(res);
	return conn_fail(L, text, code);
}

/* Lua values become text parameters; tables become JSON. */
static const char *conn_param(lua_State *L, int idx, int num)
{
	switch (lua_type(L, idx)) {
	case LUA_TNIL:
		return NULL;
	case LUA_TBOOLEAN:
		return lua_toboolean(L, idx) ? "t" : "f";
	case LUA_TNUMBER:
		if (lua_isinteger(L, idx)) {
			lua_pushfstring(L, "%I", (LUA_INTEGER)lua_tointeger(L, idx));
		} else {
			char buf[64];
			double d = lua_tonumber(L, idx);
			if (d != d || d - d != 0.0)
				luaL_error(L, "msgbus: parameter $%d: NaN and infinity cannot be sent", num);
			snprintf(buf, sizeof buf, "%.17g", d);
			lua_pushstring(L, buf);
		}
		lua_replace(L, idx);
		return lua_tostring(L, idx);
	case LUA_TSTRING: {
		/* libpq takes parameters as C strings: a NUL byte would cut the value short
		 * without a word (and text cannot hold one) */
		size_t len;
		const char *s = lua_tolstring(L, idx, &len);
		if (strlen(s) != len)
			luaL_error(L, "msgbus: parameter $%d contains a NUL byte, which PostgreSQL text cannot hold", num);
		return s;
	}
	case LUA_TTABLE:
		lua_pushvalue(L, UV_ENCODE);
		lua_pushvalue(L, idx);
		lua_call(L, 1, 1);
		lua_replace(L, idx);
		return lua_tostring(L, idx);
	case LUA_TLIGHTUSERDATA:
		if (lua_touserdata(L, idx) == NULL)
			return NULL; /* the JSON null sentinel */
		/* fall through */
	default:
		luaL_error(L, "msgbus: parameter $%d: cannot send a %s", num, luaL_typename(L, idx));
		return NULL;
	}
}

/* Collect parameters first..top into values[]; returns the count. */
static int conn_params(lua_State *L, int first, const char **values)
{
	int top = lua_gettop(L), n = top - first + 1, i;
	if (n < 0)
		n = 0;
	luaL_argcheck(L, n <= MAX_PARAMS, first, "too many parameters");
	for (i = 0; i < n; i++)
		values[i] = conn_param(L, first + i, i + 1);
	return n;
}

static void conn_pushvalue(lua_State *L, PGresult *res, int row, int col)
{
	const char *v = PQgetvalue(res, row, col);
	size_t len = (size_t)PQgetlength(res, row, col);
	switch (PQftype(res, col)) {
	case OID_BOOL:
		lua_pushboolean(L, v[0] == 't');
		break;
	case OID_INT2:
	case OID_INT4:
	case OID_INT8:
		lua_pushinteger(L, (lua_Integer)strtoll(v, NULL, 10));
		break;
	case OID_FLOAT4:
	case OID_FLOAT8:
		/* the server sends shortest round-trip text (extra_float_digits = 1 default) */
		if (lua_stringtonumber(L, v) == 0)
			lua_pushlstring(L, v, len);
		else if (lua_isinteger(L, -1))
			lua_pushnumber(L, (lua_Number)lua_tointeger(L, -1)), lua_remove(L, -2);
		break;
	case OID_JSON:
	case OID_JSONB:
		/* as deep as the codec goes: the inbox refuses deeper data on arrival */
		lua_pushvalue(L, UV_DECODE);
		lua_pushlstring(L, v, len);
		lua_pushinteger(L, MSGBUS_JSON_MAX_DEPTH);
		lua_call(L, 2, 1);
		break;
	default:
		lua_pushlstring(L, v, len);
	}
}

/* Rows as an array of tables keyed by column name; NULL columns are absent. */
static int conn_pushresult(lua_State *L, PGresult *res)
{
	int nrows = PQntuples(res), ncols = PQnfields(res), r, col;
	const char *affected = PQcmdTuples(res);
	lua_createtable(L, nrows, 0);
	for (r = 0; r < nrows; r++) {
		lua_createtable(L, 0, ncols);
		for (col = 0; col < ncols; col++) {
			if (PQgetisnull(res, r, col))
				continue;
			conn_pushvalue(L, res, r, col);
			lua_setfield(L, -2, PQfname(res, col));
		}
		lua_rawseti(L, -2, r + 1);
	}
	lua_pushinteger(L, affected && *affected ? (lua_Integer)strtoll(affected, NULL, 10) : nrows);
	return 2;
}

/*
 * Copying what libpq allocated into Lua can raise (out of memory, or a JSON column
 * the codec refuses) and so leak the libpq memory. The copy is therefore made by
 * push(p) under lua_pcall, with the calling method's first `nup` upvalues (the JSON
 * functions, for conversions that need them); the caller frees its libpq memory,
 * then looks at the status: LUA_OK leaves nresults values, anything else the error.
 */
static int conn_protected(lua_State *L, lua_CFunction push, void *p, int nup, int nresults)
{
	int i;
	for (i = 1; i <= nup; i++)
		lua_pushvalue(L, lua_upvalueindex(i));
	lua_pushcclosure(L, push, nup);
	lua_pushlightuserdata(L, p);
	return lua_pcall(L, 1, nresults, 0);
}

static int conn_pushresult_p(lua_State *L)
{
	return conn_pushresult(L, lua_touserdata(L, 1));
}

/* Shared ending of exec and run: a result or the fail tuple. The rows are converted
 * by conn_protected, so that the result is cleared whatever happens: a column that
 * does not convert (JSON nested deeper than the codec goes) gives the fail tuple
 * with code "decode"; a memory error is raised again. */
static int conn_finish(lua_State *L, Conn *c, PGresult *res)
{
	ExecStatusType st;
	int rc;
	if (res == NULL)
		return conn_fail_conn(L, c);
	st = PQresultStatus(res);
	if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && st != PGRES_EMPTY_QUERY)
		return conn_fail_result(L, c, res);
	rc = conn_protected(L, conn_pushresult_p, res, 2, 2);
	PQclear(res);
	if (rc == LUA_ERRMEM)
		return lua_error(L);
	if (rc != LUA_OK) {
		const char *msg = lua_tostring(L, -1);
		if (msg == NULL)
			msg = "a column could not be converted";
		else if (strncmp(msg, "msgbus: ", 8) == 0)
			msg += 8;
		return conn_fail(L, msg, "decode");
	}
	return 2;
}

/* conn:exec(sql, ...) -> rows, affected | nil, err, code */
static int conn_exec(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	const char *sql = luaL_checkstring(L, 2);
	const char *values[MAX_PARAMS];
	int n = conn_params(L, 3, values);
	PGresult *res = PQexecParams(c->pg, sql, n, NULL, values, NULL, NULL, 0);
	return conn_finish(L, c, res);
}

/* conn:script(sql) runs several statements (the simple query protocol, no parameters). */
static int conn_script(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	const char *sql = luaL_checkstring(L, 2);
	PGresult *res = PQexec(c->pg, sql);
	return conn_finish(L, c, res);
}

/* conn:prepare(name, sql) -> true | nil, err, code */
static int conn_prepare(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	const char *name = luaL_checkstring(L, 2);
	const char *sql = luaL_checkstring(L, 3);
	PGresult *res = PQprepare(c->pg, name, sql, 0, NULL);
	if (res == NULL)
		return conn_fail_conn(L, c);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		return conn_fail_result(L, c, res);
	PQclear(res);
	lua_pushboolean(L, 1);
	return 1;
}

/* conn:run(name, ...) executes a prepared statement. */
static int conn_run(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	const char *name = luaL_checkstring(L, 2);
	const char *values[MAX_PARAMS];
	int n = conn_params(L, 3, values);
	PGresult *res = PQexecPrepared(c->pg, name, n, values, NULL, NULL, 0);
	return conn_finish(L, c, res);
}

/* Move every pending notification into the array on top of the stack. */
static int conn_pushnote(lua_State *L)
{
	const PGnotify *nt = lua_touserdata(L, 1);
	lua_createtable(L, 0, 3);
	lua_pushstring(L, nt->relname);
	lua_setfield(L, -2, "channel");
	lua_pushstring(L, nt->extra);
	lua_setfield(L, -2, "payload");
	lua_pushinteger(L, nt->be_pid);
	lua_setfield(L, -2, "pid");
	return 1;
}

/* Each notification becomes a table by conn_protected, so that libpq's copy is
 * freed even when that raises (out of memory); the error is raised again after. */
static int conn_drain(lua_State *L, Conn *c)
{
	PGnotify *nt;
	int n = (int)lua_rawlen(L, -1);
	while ((nt = PQnotifies(c->pg)) != NULL) {
		int st = conn_protected(L, conn_pushnote, nt, 0, 1);
		PQfreemem(nt);
		if (st != LUA_OK)
			lua_error(L);
		lua_rawseti(L, -2, ++n);
	}
	return n;
}

/*
 * conn:wait([timeout]) -> notifications (an array, empty on timeout)
 *                       | nil, err, "closed"
 * Returns as soon as at least one notification is there.
 */
static int conn_wait(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	double timeout = conn_opttimeout(L, 2);
	double deadline = timeout < 0 ? -1.0 : conn_now() + timeout;
	struct pollfd pfd;
	lua_newtable(L);
	for (;;) {
		int ms, rc;
		if (!PQconsumeInput(c->pg))
			return conn_fail_conn(L, c);
		if (conn_drain(L, c) > 0)
			return 1;
		if (deadline >= 0) {
			double left = deadline - conn_now();
			if (left <= 0)
				return 1;
			/* a day at most per poll: any longer timeout goes round again */
			ms = left > 86400.0 ? 86400000 : (int)(left * 1000.0) + 1;
		} else {
			ms = -1;
		}
		pfd.fd = PQsocket(c->pg);
		if (pfd.fd < 0)
			return conn_fail(L, "connection has no socket", "closed");
		pfd.events = POLLIN;
		pfd.revents = 0;
		rc = poll(&pfd, 1, ms);
		if (rc < 0 && errno != EINTR)
			return conn_fail(L, strerror(errno), "closed");
	}
}

/* conn:notifications() -> array of what arrived, without waiting. */
static int conn_notifications(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	lua_newtable(L);
	if (!PQconsumeInput(c->pg))
		return conn_fail_conn(L, c);
	conn_drain(L, c);
	return 1;
}

/*
 * conn:queued() -> array of the notifications libpq has read already, along with the
 * answers of statements, without reading the socket (they will not make it readable
 * again); they leave libpq's list, which nothing else empties between waits.
 */
static int conn_queued(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	lua_newtable(L);
	conn_drain(L, c);
	return 1;
}

static int conn_socket(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	lua_pushinteger(L, PQsocket(c->pg));
	return 1;
}

/* conn:ok() -> whether libpq still considers the connection usable. */
static int conn_ok(lua_State *L)
{
	Conn *c = luaL_checkudata(L, 1, CONN_MT);
	lua_pushboolean(L, c->pg != NULL && PQstatus(c->pg) == CONNECTION_OK);
	return 1;
}

static int conn_txstatus(lua_State *L)
{
	static const char *const names[] = {"idle", "active", "intrans", "inerror", "unknown"};
	Conn *c = conn_check(L, 1);
	PGTransactionStatusType st = PQtransactionStatus(c->pg);
	lua_pushstring(L, names[st <= PQTRANS_UNKNOWN ? st : PQTRANS_UNKNOWN]);
	return 1;
}

static int conn_backend_pid(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	lua_pushinteger(L, PQbackendPID(c->pg));
	return 1;
}

static int conn_copytext(lua_State *L)
{
	lua_pushstring(L, lua_touserdata(L, 1));
	return 1;
}

/* Push a string libpq allocated and free it (see conn_protected). */
static void conn_pushfree(lua_State *L, char *s)
{
	int st = conn_protected(L, conn_copytext, s, 0, 1);
	PQfreemem(s);
	if (st != LUA_OK)
		lua_error(L);
}

static int conn_escape(lua_State *L, int identifier)
{
	Conn *c = conn_check(L, 1);
	size_t len;
	const char *s = luaL_checklstring(L, 2, &len);
	char *out;
	/* libpq stops at a NUL byte: the quoted text would be shorter than asked for */
	luaL_argcheck(L, strlen(s) == len, 2, "contains a NUL byte");
	out = identifier ? PQescapeIdentifier(c->pg, s, len) : PQescapeLiteral(c->pg, s, len);
	if (out == NULL)
		return conn_fail_conn(L, c);
	conn_pushfree(L, out);
	return 1;
}

static int conn_escape_identifier(lua_State *L)
{
	return conn_escape(L, 1);
}

static int conn_escape_literal(lua_State *L)
{
	return conn_escape(L, 0);
}

/* conn:encrypt_password(password, role): the verifier the server stores, made here so
 * that the clear password never travels to the server nor lands in its logs. */
static int conn_encrypt_password(lua_State *L)
{
	Conn *c = conn_check(L, 1);
	const char *pw = luaL_checkstring(L, 2);
	const char *user = luaL_checkstring(L, 3);
	char *out = PQencryptPasswordConn(c->pg, pw, user, NULL);
	if (out == NULL)
		return conn_fail_conn(L, c);
	conn_pushfree(L, out);
	return 1;
}

/* close, __gc and __close: idempotent. */
static int conn_close(lua_State *L)
{
	Conn *c = luaL_checkudata(L, 1, CONN_MT);
	if (c->pg != NULL) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
	return 0;
}

static int conn_tostring(lua_State *L)
{
	Conn *c = luaL_checkudata(L, 1, CONN_MT);
	if (c->pg == NULL)
		lua_pushliteral(L, "msgbus.Conn (closed)");
	else
		lua_pushfstring(L, "msgbus.Conn (%p)", (void *)c);
	return 1;
}

static void conn_ignore_notice(void *arg, const char *msg)
{
	(void)arg;
	(void)msg;
}

/*
 * core.connect(conninfo [, extra]) -> conn | nil, err, code
 * conninfo is a keyword/value string or a URI; extra is a table of keyword = value
 * that override it (the Lua layer adds defaults only where conninfo has none).
 */
static int conn_connect(lua_State *L)
{
	const char *info = luaL_checkstring(L, 1);
	const char *keys[64], *vals[64];
	int n = 0;
	Conn *c;
	keys[n] = "dbname";
	vals[n++] = info;
	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TTABLE);
		lua_pushnil(L);
		while (lua_next(L, 2) != 0) {
			luaL_argcheck(L, n < 63, 2, "too many connection options");
			luaL_argcheck(L, lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING, 2,
			              "connection options must be strings");
			keys[n] = lua_tostring(L, -2);
			vals[n++] = lua_tostring(L, -1);
			lua_pop(L, 1); /* the strings stay alive in the table */
		}
	}
	keys[n] = NULL;
	vals[n] = NULL;
	c = lua_newuserdatauv(L, sizeof(Conn), 0);
	c->pg = NULL; /* closed first: a memory error below can never leak a PGconn */
	luaL_setmetatable(L, CONN_MT);
	c->pg = PQconnectdbParams(keys, vals, 1);
	if (c->pg == NULL)
		return conn_fail(L, "out of memory", "connection");
	if (PQstatus(c->pg) != CONNECTION_OK) {
		int r = conn_fail(L, PQerrorMessage(c->pg), "connection");
		PQfinish(c->pg);
		c->pg = NULL;
		return r;
	}
	/* server notices (e.g. "relation already exists, skipping") are not errors */
	PQsetNoticeProcessor(c->pg, conn_ignore_notice, NULL);
	return 1;
}

/* The table of conninfo_parse, made by conn_protected. */
static int conn_pushoptions(lua_State *L)
{
	const PQconninfoOption *o;
	lua_newtable(L);
	for (o = lua_touserdata(L, 1); o->keyword != NULL; o++) {
		if (o->val == NULL)
			continue;
		lua_pushstring(L, o->val);
		lua_setfield(L, -2, o->keyword);
	}
	return 1;
}

/* core.conninfo_parse(conninfo) -> { keyword = value, ... } | nil, err */
static int conn_conninfo_parse(lua_State *L)
{
	const char *info = luaL_checkstring(L, 1);
	char *err = NULL;
	PQconninfoOption *opts = PQconninfoParse(info, &err);
	int st;
	if (opts == NULL) {
		if (err == NULL)
			return conn_fail(L, "out of memory", "conninfo");
		conn_pushfree(L, err);
		return conn_fail(L, lua_tostring(L, -1), "conninfo");
	}
	st = conn_protected(L, conn_pushoptions, opts, 0, 1);
	PQconninfoFree(opts);
	if (st != LUA_OK)
		return lua_error(L);
	return 1;
}

static const luaL_Reg conn_methods[] = {
	{"exec", conn_exec},
	{"script", conn_script},
	{"prepare", conn_prepare},
	{"run", conn_run},
	{"wait", conn_wait},
	{"notifications", conn_notifications},
	{"queued", conn_queued},
	{"socket", conn_socket},
	{"ok", conn_ok},
	{"txstatus", conn_txstatus},
	{"backend_pid", conn_backend_pid},
	{"escape_identifier", conn_escape_identifier},
	{"escape_literal", conn_escape_literal},
	{"encrypt_password", conn_encrypt_password},
	{"close", conn_close},
	{NULL, NULL},
};

static const luaL_Reg conn_meta[] = {
	{"__gc", conn_close},
	{"__close", conn_close},
	{"__tostring", conn_tostring},
	{NULL, NULL},
};

void conn_open(lua_State *L)
{
	luaL_newmetatable(L, CONN_MT);
	luaL_setfuncs(L, conn_meta, 0);
	lua_newtable(L);
	lua_getfield(L, -3, "json_encode");
	lua_getfield(L, -4, "json_decode");
	luaL_setfuncs(L, conn_methods, 2);
	lua_setfield(L, -2, "__index");
	lua_pop(L, 1);
	lua_pushcfunction(L, conn_connect);
	lua_setfield(L, -2, "connect");
	lua_pushcfunction(L, conn_conninfo_parse);
	lua_setfield(L, -2, "conninfo_parse");
}
