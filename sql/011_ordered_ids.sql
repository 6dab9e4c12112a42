-- msgbus schema, version 11: message ids that grow with time.
--
-- Every arriving message's id goes into the primary key of msgbus.seen, which keeps
-- the ids of the last dedup_retention (7 days by default) to drop resent copies.
-- With random ids (gen_random_uuid, version 4), each insert lands on a random leaf
-- page of that index: the whole index is the working set, and once it outgrows
-- shared_buffers each arriving message costs a random read. Measured in the
-- receiver's apply worker with 1.08 million ids in msgbus.seen (its key 40 MB,
-- shared_buffers 64 MB), pg_stat_statements with track = all: the insert into
-- msgbus.seen took 13.3-13.8 µs with random ids and 7.9-8.2 µs with ids that grow
-- with time, which go to the right-hand end of the index.
--
-- A message's id is now a version 7 UUID (RFC 9562): the first 48 bits are the
-- milliseconds since 1970 (the sender's clock when the row is inserted), then the
-- version, then 74 random bits (with the variant). They are as unguessable as
-- before for all practical purposes and sort by time to the millisecond (within
-- one millisecond, at random). Ids sent before this migration stay as they are.
--
-- The default is an expression of built-in functions, not a function of msgbus's:
-- every role that may insert a message may evaluate it, and the names in it were
-- resolved when this ran, so no search_path can change what it calls.

alter table msgbus.messages alter column id set default
    pg_catalog.encode(
        pg_catalog.set_bit(pg_catalog.set_bit(
            pg_catalog.overlay(
                pg_catalog.uuid_send(pg_catalog.gen_random_uuid()),
                pg_catalog.substr(pg_catalog.int8send(pg_catalog.floor(
                    pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())
                    operator(pg_catalog.*) 1000)::bigint), 3),
                1, 6),
            52, 1), 53, 1),   -- version 4 -> 7: bits 4 and 5 of byte 6 (0100 -> 0111)
        'hex')::uuid;
