/* msgbus.core: the private C core under the public Lua module "msgbus". */
#include "msgbus.h"

int luaopen_msgbus_core(lua_State *L);

int luaopen_msgbus_core(lua_State *L)
{
	lua_newtable(L);
	json_open(L); /* first: the connection methods keep its codec as upvalues */
	conn_open(L);
	util_open(L);
	return 1;
}
