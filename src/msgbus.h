/* Shared declarations of the msgbus C core (module msgbus.core). */
#ifndef MSGBUS_H
#define MSGBUS_H

#include <lua.h>
#include <lauxlib.h>

/* Each concern adds its functions to the module table on top of the stack. */
void conn_open(lua_State *L);
void json_open(lua_State *L);
void util_open(lua_State *L);

#endif
