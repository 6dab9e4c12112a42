/* Shared declarations of the msgbus C core (module msgbus.core). */
#ifndef MSGBUS_H
#define MSGBUS_H

#include <lua.h>
#include <lauxlib.h>

/* The deepest JSON nesting the codec encodes or decodes (its maxdepth argument's
 * upper bound; server-produced JSON is decoded with it). The codec recurses in C
 * once per level: this bounds the C stack it uses. */
#define MSGBUS_JSON_MAX_DEPTH 1000

/* Each concern adds its functions to the module table on top of the stack. */
void conn_open(lua_State *L);
void json_open(lua_State *L);
void util_open(lua_State *L);

#endif
