/* An exact JSON codec: integers stay integers, floats round-trip bit for bit
 * and stay floats, strings must be valid UTF-8. Exposes json_encode,
 * json_decode, json_null and json_array_mt on the module table. */
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msgbus.h"

/* Round-tripping relies on floats being IEEE doubles (strtod) and integers
 * having 64 bits (the int64 rule of the decoder). */
#if LUA_FLOAT_TYPE != LUA_FLOAT_DOUBLE
#error "msgbus needs Lua built with double floats"
#endif

#define JSON_DEFAULT_DEPTH 100

/* ---------------------------------------------------------------- utf8 */

/* Length of the valid UTF-8 sequence starting at a non-ASCII byte s[0]
 * (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF), or 0. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned char c = s[0], lo = 0x80, hi = 0xBF;
	size_t len, i;
	if (c >= 0xC2 && c <= 0xDF)
		len = 2;
	else if (c >= 0xE0 && c <= 0xEF) {
		len = 3;
		if (c == 0xE0)
			lo = 0xA0; /* overlong below U+0800 */
		else if (c == 0xED)
			hi = 0x9F; /* surrogates D800-DFFF */
	} else if (c >= 0xF0 && c <= 0xF4) {
		len = 4;
		if (c == 0xF0)
			lo = 0x90; /* overlong below U+10000 */
		else if (c == 0xF4)
			hi = 0x8F; /* above U+10FFFF */
	} else
		return 0;
	if (n < len || s[1] < lo || s[1] > hi)
		return 0;
	for (i = 2; i < len; i++)
		if (s[i] < 0x80 || s[i] > 0xBF)
			return 0;
	return len;
}

/* Writes code point cp (valid, not a surrogate) as UTF-8; returns the length. */
static size_t utf8_put(char *out, unsigned long cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}

/* The process locale may use another decimal point (os.setlocale); printf and
 * strtod follow it, so the codec translates between it and JSON's '.'. */
static const char *json_decpoint(size_t *len)
{
	const char *dp = localeconv()->decimal_point;
	if (dp == NULL || dp[0] == '\0')
		dp = ".";
	*len = strlen(dp);
	return dp;
}

/* -------------------------------------------------------------- output */

/* The encoder's output buffer. luaL_Buffer needs its box on top of the stack
 * for every append, which a recursive encoder keeping tables and keys on the
 * stack cannot give; so the bytes live in a plain userdata at a fixed stack
 * slot, replaced when it grows. It comes from Lua's allocator and an error
 * anywhere leaves it to the garbage collector: nothing can leak. */
typedef struct {
	char *data;
	size_t len, cap;
	int slot; /* stack index of the userdata once data leaves local */
	char local[256]; /* small results need no allocation */
} JBuf;

static void jbuf_grow(lua_State *L, JBuf *b, size_t need)
{
	size_t cap = b->cap;
	char *data;
	if (need > (size_t)-1 / 2 - b->len)
		luaL_error(L, "msgbus: JSON text too large");
	while (cap < b->len + need)
		cap *= 2;
	data = lua_newuserdatauv(L, cap, 0);
	memcpy(data, b->data, b->len);
	lua_replace(L, b->slot); /* the old block becomes garbage */
	b->data = data;
	b->cap = cap;
}

static void jbuf_add(lua_State *L, JBuf *b, const char *s, size_t n)
{
	if (b->cap - b->len < n)
		jbuf_grow(L, b, n);
	memcpy(b->data + b->len, s, n);
	b->len += n;
}

static void jbuf_addchar(lua_State *L, JBuf *b, char c)
{
	if (b->len == b->cap)
		jbuf_grow(L, b, 1);
	b->data[b->len++] = c;
}

/* ------------------------------------------------------------- encoder */

typedef struct {
	lua_State *L;
	JBuf buf;
	int maxdepth;
} Enc;

/* Where the encoder is, for error messages: a chain up to the root value. */
typedef struct EncPath {
	const struct EncPath *up;
	const char *key; /* object member name, or NULL for an array element */
	size_t klen;
	lua_Integer index;
} EncPath;

static int enc_isident(const char *s, size_t n)
{
	size_t i;
	if (n == 0 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z') || s[0] == '_'))
		return 0;
	for (i = 1; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
			return 0;
	}
	return 1;
}

/* Appends the path as Lua indexing, e.g. $.items[2]["a b"]. */
static void enc_addpath(luaL_Buffer *b, const EncPath *p)
{
	size_t i;
	if (p == NULL) {
		luaL_addchar(b, '$');
		return;
	}
	enc_addpath(b, p->up);
	if (p->key == NULL) {
		lua_pushfstring(b->L, "[%I]", (LUA_INTEGER)p->index);
		luaL_addvalue(b);
	} else if (enc_isident(p->key, p->klen)) {
		luaL_addchar(b, '.');
		luaL_addlstring(b, p->key, p->klen);
	} else {
		luaL_addstring(b, "[\"");
		for (i = 0; i < p->klen; i++) {
			unsigned char c = (unsigned char)p->key[i];
			if (c == '"' || c == '\\') {
				luaL_addchar(b, '\\');
				luaL_addchar(b, (char)c);
			} else if (c >= 0x20 && c < 0x7F) {
				luaL_addchar(b, (char)c);
			} else {
				char hex[8];
				snprintf(hex, sizeof hex, "\\x%02X", c);
				luaL_addstring(b, hex);
			}
		}
		luaL_addstring(b, "\"]");
	}
}

/* Raises msg, followed by where in the value it happened unless at the root. */
static int enc_fail(Enc *e, const EncPath *path, const char *msg)
{
	luaL_Buffer b;
	luaL_buffinit(e->L, &b);
	luaL_addstring(&b, msg);
	if (path != NULL) {
		luaL_addstring(&b, " (at ");
		enc_addpath(&b, path);
		luaL_addchar(&b, ')');
	}
	luaL_pushresult(&b);
	return lua_error(e->L);
}

static void enc_integer(Enc *e, lua_Integer v)
{
	char tmp[24], *p = tmp + sizeof tmp;
	lua_Unsigned u = (lua_Unsigned)v;
	if (v < 0)
		u = 0u - u; /* also right for mininteger, unlike -v */
	do {
		*--p = (char)('0' + u % 10);
		u /= 10;
	} while (u != 0);
	if (v < 0)
		*--p = '-';
	jbuf_add(e->L, &e->buf, p, (size_t)(tmp + sizeof tmp - p));
}

static void enc_float(Enc *e, lua_Number x, const EncPath *path)
{
	char tmp[64], out[64];
	const char *dp;
	size_t dplen, i, n = 0;
	int prec;
	if (isnan(x) || isinf(x))
		enc_fail(e, path, "msgbus: cannot encode NaN or infinity as JSON");
	/* The shortest of these that reads back as the same double; 17 always does. */
	for (prec = 15; prec < 17; prec++) {
		snprintf(tmp, sizeof tmp, "%.*g", prec, x);
		if (strtod(tmp, NULL) == x)
			break;
	}
	if (prec == 17)
		snprintf(tmp, sizeof tmp, "%.17g", x);
	dp = json_decpoint(&dplen);
	for (i = 0; tmp[i] != '\0';) {
		if (strncmp(tmp + i, dp, dplen) == 0) {
			out[n++] = '.';
			i += dplen;
		} else
			out[n++] = tmp[i++];
	}
	/* Keep integral floats floats: 1.0 must not come back as integer 1. */
	if (memchr(out, '.', n) == NULL && memchr(out, 'e', n) == NULL) {
		out[n++] = '.';
		out[n++] = '0';
	}
	jbuf_add(e->L, &e->buf, out, n);
}

static void enc_string(Enc *e, const char *str, size_t len, const EncPath *path, const char *what)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *s = (const unsigned char *)str;
	size_t i = 0, run = 0;
	JBuf *b = &e->buf;
	jbuf_addchar(e->L, b, '"');
	while (i < len) {
		unsigned char c = s[i];
		char esc[6];
		size_t elen = 2;
		if (c >= 0x80) {
			size_t n = utf8_seq(s + i, len - i);
			if (n == 0)
				enc_fail(e, path, lua_pushfstring(e->L, "msgbus: %s is not valid UTF-8", what));
			i += n;
			continue;
		}
		if (c >= 0x20 && c != '"' && c != '\\' && c != 0x7F) {
			i++;
			continue;
		}
		jbuf_add(e->L, b, str + run, i - run);
		esc[0] = '\\';
		switch (c) {
		case '"': esc[1] = '"'; break;
		case '\\': esc[1] = '\\'; break;
		case '\b': esc[1] = 'b'; break;
		case '\f': esc[1] = 'f'; break;
		case '\n': esc[1] = 'n'; break;
		case '\r': esc[1] = 'r'; break;
		case '\t': esc[1] = 't'; break;
		default:
			esc[1] = 'u';
			esc[2] = '0';
			esc[3] = '0';
			esc[4] = hex[c >> 4];
			esc[5] = hex[c & 15];
			elen = 6;
		}
		jbuf_add(e->L, b, esc, elen);
		run = ++i;
	}
	jbuf_add(e->L, b, str + run, len - run);
	jbuf_addchar(e->L, b, '"');
}

enum { ENC_ARRAY, ENC_OBJECT };

/* Decides whether the table at idx is an array or an object, raising for
 * tables that are neither; *count gets its number of keys. */
static int enc_kind(Enc *e, int idx, lua_Integer *count, const EncPath *path)
{
	lua_State *L = e->L;
	int forced = -1;
	lua_Integer n = 0, nstr = 0, nint = 0, maxkey = 0, nonpos = 0;
	if (lua_getmetatable(L, idx)) {
		lua_pushliteral(L, "__jsontype");
		if (lua_rawget(L, -2) != LUA_TNIL) {
			const char *t = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
			if (strcmp(t, "array") == 0)
				forced = ENC_ARRAY;
			else if (strcmp(t, "object") == 0)
				forced = ENC_OBJECT;
			else
				enc_fail(e, path, "msgbus: __jsontype must be \"array\" or \"object\"");
		}
		lua_pop(L, 2);
	}
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		n++;
		if (lua_type(L, -1) == LUA_TSTRING)
			nstr++;
		else if (lua_isinteger(L, -1)) {
			lua_Integer k = lua_tointeger(L, -1);
			nint++;
			if (k < 1)
				nonpos = 1;
			else if (k > maxkey)
				maxkey = k;
		} else {
			const char *t = lua_type(L, -1) == LUA_TNUMBER ? "non-integer number" : luaL_typename(L, -1);
			enc_fail(e, path, lua_pushfstring(L,
				"msgbus: table has a %s key, cannot be JSON (keys must be strings, or integers 1..n)", t));
		}
	}
	*count = n;
	if (n == 0)
		return forced == ENC_ARRAY ? ENC_ARRAY : ENC_OBJECT;
	if (nstr == n) {
		if (forced == ENC_ARRAY)
			enc_fail(e, path, "msgbus: table marked as array has string keys, cannot be JSON");
		return ENC_OBJECT;
	}
	if (nint == n) {
		if (forced == ENC_OBJECT)
			enc_fail(e, path, "msgbus: table marked as object has integer keys, cannot be JSON (object keys are strings)");
		if (nonpos || maxkey != n)
			enc_fail(e, path, "msgbus: table has sparse integer keys (holes, or keys outside 1..n), cannot be JSON");
		return ENC_ARRAY;
	}
	return enc_fail(e, path, "msgbus: table has mixed string and integer keys, cannot be JSON");
}

typedef struct {
	const char *s;
	size_t len;
	lua_Integer pos; /* index of the key in the keys table */
} EncKey;

static int enc_keycmp(const void *a, const void *b)
{
	const EncKey *x = a, *y = b;
	int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
	if (c != 0)
		return c;
	return (x->len > y->len) - (x->len < y->len);
}

static void enc_value(Enc *e, int idx, int depth, const EncPath *path);

static void enc_table(Enc *e, int idx, int depth, const EncPath *path)
{
	lua_State *L = e->L;
	lua_Integer n, i;
	EncPath child;
	if (depth >= e->maxdepth) /* also how reference cycles end */
		luaL_error(L, "msgbus: JSON nesting deeper than %d", e->maxdepth);
	luaL_checkstack(L, 8, "msgbus: JSON nesting too deep");
	child.up = path;
	if (enc_kind(e, idx, &n, path) == ENC_ARRAY) {
		child.key = NULL;
		child.klen = 0;
		jbuf_addchar(L, &e->buf, '[');
		for (i = 1; i <= n; i++) {
			if (i > 1)
				jbuf_addchar(L, &e->buf, ',');
			lua_rawgeti(L, idx, i);
			child.index = i;
			enc_value(e, lua_gettop(L), depth + 1, &child);
			lua_pop(L, 1);
		}
		jbuf_addchar(L, &e->buf, ']');
	} else {
		/* Keys are sorted so equal tables give equal text. The key strings
		 * stay referenced by the keys table, so their pointers stay valid. */
		int kidx;
		EncKey *keys;
		lua_createtable(L, (int)(n < 0x7FFFFFFF ? n : 0), 0);
		kidx = lua_gettop(L);
		keys = lua_newuserdatauv(L, (size_t)n * sizeof *keys + 1, 0);
		i = 0;
		lua_pushnil(L);
		while (lua_next(L, idx)) {
			lua_pop(L, 1);
			lua_pushvalue(L, -1);
			keys[i].s = lua_tolstring(L, -1, &keys[i].len);
			keys[i].pos = i + 1;
			lua_rawseti(L, kidx, ++i);
		}
		n = i; /* fewer if the collector emptied entries of a weak table since enc_kind */
		qsort(keys, (size_t)n, sizeof *keys, enc_keycmp);
		child.index = 0;
		jbuf_addchar(L, &e->buf, '{');
		for (i = 0; i < n; i++) {
			if (i > 0)
				jbuf_addchar(L, &e->buf, ',');
			enc_string(e, keys[i].s, keys[i].len, path, "object key");
			jbuf_addchar(L, &e->buf, ':');
			lua_rawgeti(L, kidx, keys[i].pos);
			lua_rawget(L, idx);
			child.key = keys[i].s;
			child.klen = keys[i].len;
			enc_value(e, lua_gettop(L), depth + 1, &child);
			lua_pop(L, 1);
		}
		jbuf_addchar(L, &e->buf, '}');
		lua_pop(L, 2);
	}
}

static void enc_value(Enc *e, int idx, int depth, const EncPath *path)
{
	lua_State *L = e->L;
	switch (lua_type(L, idx)) {
	case LUA_TBOOLEAN:
		if (lua_toboolean(L, idx))
			jbuf_add(L, &e->buf, "true", 4);
		else
			jbuf_add(L, &e->buf, "false", 5);
		break;
	case LUA_TNUMBER:
		if (lua_isinteger(L, idx))
			enc_integer(e, lua_tointeger(L, idx));
		else
			enc_float(e, lua_tonumber(L, idx), path);
		break;
	case LUA_TSTRING: {
		size_t len;
		const char *s = lua_tolstring(L, idx, &len);
		enc_string(e, s, len, path, "string");
		break;
	}
	case LUA_TTABLE:
		enc_table(e, idx, depth, path);
		break;
	case LUA_TLIGHTUSERDATA:
		if (lua_touserdata(L, idx) == NULL) { /* json_null */
			jbuf_add(L, &e->buf, "null", 4);
			break;
		}
		enc_fail(e, path, "msgbus: cannot encode userdata as JSON");
		break;
	default:
		enc_fail(e, path, lua_pushfstring(L, "msgbus: cannot encode %s as JSON%s", luaL_typename(L, idx),
			lua_isnil(L, idx) ? " (use json_null for null)" : ""));
	}
}

static int json_checkdepth(lua_State *L, int arg)
{
	lua_Integer d = luaL_optinteger(L, arg, JSON_DEFAULT_DEPTH);
	luaL_argcheck(L, d >= 0 && d <= MSGBUS_JSON_MAX_DEPTH, arg, "maxdepth must be between 0 and 1000");
	return (int)d;
}

/* json_encode(value [, maxdepth]) -> JSON text */
static int json_encode(lua_State *L)
{
	Enc e;
	e.L = L;
	e.maxdepth = json_checkdepth(L, 2);
	lua_settop(L, 1);
	lua_pushnil(L); /* slot 2: the output userdata once it outgrows local */
	e.buf.data = e.buf.local;
	e.buf.len = 0;
	e.buf.cap = sizeof e.buf.local;
	e.buf.slot = 2;
	enc_value(&e, 1, 0, NULL);
	lua_pushlstring(L, e.buf.data, e.buf.len);
	return 1;
}

/* ------------------------------------------------------------- decoder */

typedef struct {
	lua_State *L;
	const char *start, *p, *end;
	int depth, maxdepth;
} Dec;

static int dec_fail(Dec *d, const char *at, const char *what)
{
	return luaL_error(d->L, "msgbus: invalid JSON at byte %I: %s", (LUA_INTEGER)(at - d->start + 1), what);
}

/* Raises "expected <what>" naming what was found at d->p instead. */
static int dec_expected(Dec *d, const char *what)
{
	char got[32];
	if (d->p == d->end)
		snprintf(got, sizeof got, "end of input");
	else if ((unsigned char)*d->p >= 0x20 && (unsigned char)*d->p < 0x7F)
		snprintf(got, sizeof got, "'%c'", *d->p);
	else
		snprintf(got, sizeof got, "byte 0x%02X", (unsigned)(unsigned char)*d->p);
	return dec_fail(d, d->p, lua_pushfstring(d->L, "expected %s, got %s", what, got));
}

static void dec_skipws(Dec *d)
{
	while (d->p < d->end && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' || *d->p == '\r'))
		d->p++;
}

static int dec_hex4(const char *s, unsigned long *out)
{
	unsigned long v = 0;
	int i;
	for (i = 0; i < 4; i++) {
		char c = s[i];
		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (unsigned long)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (unsigned long)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (unsigned long)(c - 'A' + 10);
		else
			return 0;
	}
	*out = v;
	return 1;
}

/* d->p is at the opening quote; pushes the string. */
static void dec_string(Dec *d)
{
	const char *s = d->p + 1, *q = s, *r;
	int escaped = 0;
	luaL_Buffer b;
	char *out;
	size_t n = 0;
	/* First pass: find the end, check raw bytes, note whether to unescape. */
	for (;;) {
		unsigned char c;
		if (q == d->end)
			dec_fail(d, d->p, "unterminated string");
		c = (unsigned char)*q;
		if (c == '"')
			break;
		if (c == '\\') {
			escaped = 1;
			if (d->end - q < 2)
				dec_fail(d, d->p, "unterminated string");
			q += 2; /* the escaped byte itself is checked below */
		} else if (c < 0x20)
			dec_fail(d, q, "control character in string (must be escaped)");
		else if (c >= 0x80) {
			size_t len = utf8_seq((const unsigned char *)q, (size_t)(d->end - q));
			if (len == 0)
				dec_fail(d, q, "invalid UTF-8 in string");
			q += len;
		} else
			q++;
	}
	d->p = q + 1;
	if (!escaped) {
		lua_pushlstring(d->L, s, (size_t)(q - s));
		return;
	}
	/* Unescaping only shrinks text, so the raw length is enough room. */
	out = luaL_buffinitsize(d->L, &b, (size_t)(q - s));
	for (r = s; r < q;) {
		unsigned long cp = 0, lo = 0;
		if (*r != '\\') {
			out[n++] = *r++;
			continue;
		}
		switch (r[1]) {
		case '"': out[n++] = '"'; break;
		case '\\': out[n++] = '\\'; break;
		case '/': out[n++] = '/'; break;
		case 'b': out[n++] = '\b'; break;
		case 'f': out[n++] = '\f'; break;
		case 'n': out[n++] = '\n'; break;
		case 'r': out[n++] = '\r'; break;
		case 't': out[n++] = '\t'; break;
		case 'u':
			if (q - r < 6 || !dec_hex4(r + 2, &cp))
				dec_fail(d, r, "invalid \\u escape (needs 4 hex digits)");
			if (cp >= 0xDC00 && cp <= 0xDFFF)
				dec_fail(d, r, "lone low surrogate in \\u escape");
			if (cp >= 0xD800 && cp <= 0xDBFF) {
				if (q - r < 12 || r[6] != '\\' || r[7] != 'u' || !dec_hex4(r + 8, &lo) || lo < 0xDC00 ||
				    lo > 0xDFFF)
					dec_fail(d, r, "lone high surrogate in \\u escape");
				cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				r += 6;
			}
			n += utf8_put(out + n, cp);
			r += 6;
			continue;
		default:
			dec_fail(d, r, "invalid escape in string");
		}
		r += 2;
	}
	luaL_pushresultsize(&b, n);
}

static int dec_isdigit(Dec *d)
{
	return d->p < d->end && *d->p >= '0' && *d->p <= '9';
}

/* Float text to double with strtod, swapping '.' for the locale's point. */
static void dec_float(Dec *d, const char *s, size_t len)
{
	char small[80], *buf = small, *endp;
	size_t dplen, i, n = 0;
	const char *dp = json_decpoint(&dplen);
	int boxed = 0;
	double x;
	if (len + dplen + 1 > sizeof small) { /* very long digit strings are valid */
		buf = lua_newuserdatauv(d->L, len + dplen + 1, 0);
		boxed = 1;
	}
	for (i = 0; i < len; i++) {
		if (s[i] == '.') {
			memcpy(buf + n, dp, dplen);
			n += dplen;
		} else
			buf[n++] = s[i];
	}
	buf[n] = '\0';
	/* Out of range gives ±HUGE_VAL or 0 like any strtod user; a message is
	 * better delivered with a lossy number than not at all. */
	x = strtod(buf, &endp);
	if (endp != buf + n)
		dec_fail(d, s, "invalid number");
	if (boxed)
		lua_pop(d->L, 1);
	lua_pushnumber(d->L, x);
}

static void dec_number(Dec *d)
{
	const char *s = d->p, *digits;
	int neg = 0, isfloat = 0;
	lua_Unsigned u = 0, limit;
	if (*d->p == '-') {
		neg = 1;
		d->p++;
	}
	digits = d->p;
	if (!dec_isdigit(d))
		dec_fail(d, s, "invalid number");
	if (*d->p == '0') {
		d->p++;
		if (dec_isdigit(d))
			dec_fail(d, s, "leading zero in number");
	} else
		while (dec_isdigit(d))
			d->p++;
	if (d->p < d->end && *d->p == '.') {
		isfloat = 1;
		d->p++;
		if (!dec_isdigit(d))
			dec_expected(d, "digit after '.'");
		while (dec_isdigit(d))
			d->p++;
	}
	if (d->p < d->end && (*d->p == 'e' || *d->p == 'E')) {
		isfloat = 1;
		d->p++;
		if (d->p < d->end && (*d->p == '+' || *d->p == '-'))
			d->p++;
		if (!dec_isdigit(d))
			dec_expected(d, "digit in exponent");
		while (dec_isdigit(d))
			d->p++;
	}
	if (!isfloat) {
		const char *c;
		limit = neg ? (lua_Unsigned)LUA_MAXINTEGER + 1u : (lua_Unsigned)LUA_MAXINTEGER;
		for (c = digits; c < d->p; c++) {
			unsigned digit = (unsigned)(*c - '0');
			if (u > (limit - digit) / 10)
				break; /* beyond int64: falls back to a float */
			u = u * 10 + digit;
		}
		if (c == d->p) {
			if (!neg)
				lua_pushinteger(d->L, (lua_Integer)u);
			else if (u == (lua_Unsigned)LUA_MAXINTEGER + 1u)
				lua_pushinteger(d->L, LUA_MININTEGER);
			else
				lua_pushinteger(d->L, -(lua_Integer)u);
			return;
		}
	}
	dec_float(d, s, (size_t)(d->p - s));
}

static void dec_literal(Dec *d, const char *word, size_t len)
{
	if ((size_t)(d->end - d->p) < len || memcmp(d->p, word, len) != 0)
		dec_fail(d, d->p, "invalid literal (expected true, false or null)");
	d->p += len;
}

static void dec_value(Dec *d);

static void dec_enter(Dec *d)
{
	if (d->depth >= d->maxdepth)
		luaL_error(d->L, "msgbus: JSON nesting deeper than %d at byte %I", d->maxdepth,
			(LUA_INTEGER)(d->p - d->start + 1));
	luaL_checkstack(d->L, 6, "msgbus: JSON nesting too deep");
	d->depth++;
	d->p++;
}

static void dec_array(Dec *d, int mtidx)
{
	lua_Integer i = 0;
	dec_enter(d);
	lua_newtable(d->L);
	lua_pushvalue(d->L, mtidx); /* so an empty array encodes back as [] */
	lua_setmetatable(d->L, -2);
	dec_skipws(d);
	if (d->p < d->end && *d->p == ']') {
		d->p++;
		d->depth--;
		return;
	}
	for (;;) {
		dec_value(d);
		lua_rawseti(d->L, -2, ++i);
		dec_skipws(d);
		if (d->p < d->end && *d->p == ',')
			d->p++;
		else if (d->p < d->end && *d->p == ']') {
			d->p++;
			break;
		} else
			dec_expected(d, "',' or ']'");
	}
	d->depth--;
}

static void dec_object(Dec *d)
{
	dec_enter(d);
	lua_newtable(d->L);
	dec_skipws(d);
	if (d->p < d->end && *d->p == '}') {
		d->p++;
		d->depth--;
		return;
	}
	for (;;) {
		dec_skipws(d);
		if (d->p == d->end || *d->p != '"')
			dec_expected(d, "a string key");
		dec_string(d);
		dec_skipws(d);
		if (d->p == d->end || *d->p != ':')
			dec_expected(d, "':'");
		d->p++;
		dec_value(d);
		lua_rawset(d->L, -3); /* a repeated key keeps the last value */
		dec_skipws(d);
		if (d->p < d->end && *d->p == ',')
			d->p++;
		else if (d->p < d->end && *d->p == '}') {
			d->p++;
			break;
		} else
			dec_expected(d, "',' or '}'");
	}
	d->depth--;
}

static void dec_value(Dec *d)
{
	dec_skipws(d);
	if (d->p == d->end)
		dec_fail(d, d->p, "unexpected end of input");
	switch (*d->p) {
	case '{':
		dec_object(d);
		break;
	case '[':
		dec_array(d, lua_upvalueindex(1));
		break;
	case '"':
		dec_string(d);
		break;
	case 't':
		dec_literal(d, "true", 4);
		lua_pushboolean(d->L, 1);
		break;
	case 'f':
		dec_literal(d, "false", 5);
		lua_pushboolean(d->L, 0);
		break;
	case 'n':
		dec_literal(d, "null", 4);
		lua_pushlightuserdata(d->L, NULL);
		break;
	default:
		if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9'))
			dec_number(d);
		else
			dec_expected(d, "a JSON value");
	}
}

/* json_decode(text [, maxdepth]) -> value; upvalue 1 is json_array_mt */
static int json_decode(lua_State *L)
{
	Dec d;
	size_t len;
	d.L = L;
	d.start = luaL_checklstring(L, 1, &len);
	d.p = d.start;
	d.end = d.start + len;
	d.depth = 0;
	d.maxdepth = json_checkdepth(L, 2);
	dec_value(&d);
	dec_skipws(&d);
	if (d.p != d.end)
		dec_fail(&d, d.p, "trailing garbage after the value");
	return 1;
}

void json_open(lua_State *L)
{
	lua_createtable(L, 0, 1); /* json_array_mt, shared by every decoded array */
	lua_pushliteral(L, "array");
	lua_setfield(L, -2, "__jsontype");
	lua_pushvalue(L, -1);
	lua_setfield(L, -3, "json_array_mt");
	lua_pushcclosure(L, json_decode, 1);
	lua_setfield(L, -2, "json_decode");
	lua_pushcfunction(L, json_encode);
	lua_setfield(L, -2, "json_encode");
	lua_pushlightuserdata(L, NULL);
	lua_setfield(L, -2, "json_null");
}
