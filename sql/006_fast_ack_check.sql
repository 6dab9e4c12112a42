-- msgbus schema, version 6: wait_ack's check keeps its plan.
--
-- msgbus.acked() was a SQL function. A SQL function with SET clauses is never
-- inlined, and PostgreSQL plans its query afresh on every call: for a query over
-- every partition of msgbus.messages that is about 200 µs of server time, and
-- wait_ack calls it at least twice per message (before it waits, and when the ack's
-- notification comes). The same query in PL/pgSQL is planned once per session, with
-- a generic plan that prunes partitions at run time: about 45 µs a call. Measured on
-- the send -> wait_ack round trip, one message at a time: p50 1.8-2.0x the raw
-- baseline before, 1.5-1.65x after.
--
-- Same answer as before: true when the message is in no outbox (acked messages
-- leave it) or its ack came before it was visible (msgbus.early_acks).
create or replace function msgbus.acked(message uuid) returns boolean
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
begin
    return exists (select 1 from msgbus.early_acks e where e.id = message)
        or not exists (
        select 1 from msgbus.messages m
         where m.id = message and m.receiver <> (select service from msgbus.config));
end $$;
