-- msgbus schema, version 2: rebuilding a link whose replication slot was lost.
--
-- A slot is invalidated when its subscriber stays away longer than the sender's
-- max_slot_wal_keep_size allows: the WAL it needed is gone, and with it every
-- message in it that was not yet applied. Everything unacknowledged is still in the
-- outbox, so the link is rebuilt by a new slot and a resend of the outbox. The
-- setup helper (setup.repair, `msgbus repair`) does it in three steps:
--
--   1. msgbus.hold(peer): take the outbox out of its publication, so that what is
--      sent from now on stays in the outbox and is not published yet;
--   2. drop the lost slot and make a new one (the peer's subscription finds it under
--      the same name, and starts where the new slot starts);
--   3. msgbus.release(peer): put the outbox back into its publication and insert
--      every row of it again, oldest first, with sends to the peer held off for the
--      moment it takes, so nothing sent meanwhile overtakes an older message.
--
-- The peer's inbox ignores the copies it already has (msgbus.seen), and acks them.
-- Either step may run again: release() after an interrupted repair is harmless.

-- A resend must put a sender's messages in the order they were sent, and several
-- messages of one transaction share now(): stamp each with the time of its own
-- insert instead, so that sent_at orders them.
alter table msgbus.messages alter column sent_at set default clock_timestamp();

-- Put every unacknowledged message to `peer` through the slot again, in send order.
create or replace function msgbus.resend(peer text) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := 'to_' || msgbus.check_service(peer);
    n bigint;
begin
    -- delete and insert again in two statements: a copy of a row is only published
    -- when it is inserted, and a unique check must not see the old row
    perform msgbus.settle_early_acks();
    execute format('create temp table msgbus_resend on commit drop as '
                   'select m, row_number() over (order by m.sent_at, m.ctid) as n from msgbus.%I m', outbox);
    execute format('delete from msgbus.%I', outbox);
    execute format('insert into msgbus.%I select (m).* from msgbus_resend order by n', outbox);
    get diagnostics n = row_count;
    drop table msgbus_resend;
    return n;
end $$;

-- The outbox to `peer` (its publication is msgbus_<outbox>), or an error when this
-- service has no link to `peer`.
create function msgbus.linked_outbox(peer text) returns text
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := 'to_' || msgbus.check_service(peer);
begin
    if to_regclass(format('msgbus.%I', outbox)) is null
       or not exists (select 1 from pg_publication where pubname = 'msgbus_' || outbox) then
        raise exception 'msgbus: service "%" is not linked here', peer using errcode = 'MB004';
    end if;
    return outbox;
end $$;

-- Whether the outbox to `peer` is published (false between hold and release).
create function msgbus.published(peer text) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select exists (select 1 from pg_publication_tables
                    where pubname = 'msgbus_to_' || msgbus.check_service(peer)
                      and schemaname = 'msgbus' and tablename = 'to_' || peer)
$$;

-- Step 1.
create function msgbus.hold(peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := msgbus.linked_outbox(peer);
    pub constant text := 'msgbus_' || outbox;
begin
    if msgbus.published(peer) then
        execute format('alter publication %I drop table msgbus.%I', pub, outbox);
    end if;
end $$;

-- Step 3. Returns how many messages went out again.
create function msgbus.release(peer text) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := msgbus.linked_outbox(peer);
    pub constant text := 'msgbus_' || outbox;
begin
    -- Waits for transactions that are sending to the peer, and holds new ones off
    -- until this one commits: they are then published after the resent copies.
    execute format('lock table msgbus.%I in exclusive mode', outbox);
    if not msgbus.published(peer) then
        execute format('alter publication %I add table msgbus.%I', pub, outbox);
    end if;
    return msgbus.resend(peer);
end $$;


revoke all on function msgbus.linked_outbox(text), msgbus.hold(text), msgbus.release(text), msgbus.published(text)
    from public;
