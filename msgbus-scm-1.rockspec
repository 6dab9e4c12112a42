rockspec_format = "3.0"
package = "msgbus"
version = "scm-1"
source = {
  url = "git+file:///msgbus",
}
description = {
  summary = "Messages between services that each own a PostgreSQL database, over logical replication",
  detailed = [[
msgbus lets services that each own a PostgreSQL database send each other messages,
wait for their acknowledgement, handle them and reply, carried by PostgreSQL's own
logical replication: no broker and no daemon. A C core over libpq under a Lua API.]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4",
  "argparse",
}
external_dependencies = {
  LIBPQ = { header = "libpq-fe.h", library = "pq" },
}
build = {
  type = "builtin",
  modules = {
    msgbus = "lua/msgbus/init.lua",
    ["msgbus.setup"] = "lua/msgbus/setup.lua",
    ["msgbus.cluster"] = "lua/msgbus/cluster.lua",
    ["msgbus.cli"] = "lua/msgbus/cli.lua",
    ["msgbus.core"] = {
      sources = { "src/core.c", "src/conn.c", "src/json.c", "src/util.c" },
      defines = { "_GNU_SOURCE" },
      incdirs = { "src", "$(LIBPQ_INCDIR)" },
      libdirs = { "$(LIBPQ_LIBDIR)" },
      libraries = { "pq" },
    },
  },
  install = {
    bin = { msgbus = "bin/msgbus" },
    -- the setup helper finds the schema next to the modules (msgbus/sql/*.sql)
    lua = {
      ["msgbus.sql.001_schema"] = "sql/001_schema.sql",
      ["msgbus.sql.002_repair"] = "sql/002_repair.sql",
      ["msgbus.sql.003_claim"] = "sql/003_claim.sql",
      ["msgbus.sql.004_passfile"] = "sql/004_passfile.sql",
      ["msgbus.sql.005_fast_arrival"] = "sql/005_fast_arrival.sql",
      ["msgbus.sql.006_fast_ack_check"] = "sql/006_fast_ack_check.sql",
      ["msgbus.sql.007_apply_cost"] = "sql/007_apply_cost.sql",
      ["msgbus.sql.008_claim_batch"] = "sql/008_claim_batch.sql",
      ["msgbus.sql.009_wait_owner"] = "sql/009_wait_owner.sql",
      ["msgbus.sql.010_claim_walk"] = "sql/010_claim_walk.sql",
      ["msgbus.sql.011_ordered_ids"] = "sql/011_ordered_ids.sql",
      ["msgbus.sql.012_batched_acks"] = "sql/012_batched_acks.sql",
      ["msgbus.sql.013_batch_arrival"] = "sql/013_batch_arrival.sql",
      ["msgbus.sql.014_packs"] = "sql/014_packs.sql",
      ["msgbus.sql.015_pack_rows"] = "sql/015_pack_rows.sql",
      ["msgbus.sql.016_named_replies"] = "sql/016_named_replies.sql",
      ["msgbus.sql.017_type_check"] = "sql/017_type_check.sql",
    },
  },
}
