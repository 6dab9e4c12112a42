-- msgbus schema, version 9: a reply whose waiter is gone is handed out again.
--
-- A row in msgbus.waits (send's await_reply, or wait_reply) keeps the reply to that
-- message out of claim() and claim_batch(), so that no listen handler takes it from
-- the wait_reply call. Only take_reply (the reply came) and wait_reply's timeout
-- removed the row: when the process that was to call wait_reply died first, or
-- crashed before it called it, the row stayed for ever and the reply was never
-- handed to anyone, a message lost in effect. msgbus.prune() did not forget waits
-- either.
--
-- A wait now records who holds it: the backend pid of the session that registered
-- it (rows from before this migration have none). msgbus.forget_orphaned_waits(grace)
-- notes when it first sees a holder's session gone (orphaned_at), and forgets the
-- wait once that is `grace` ago; the reply then goes to listen handlers like any
-- message, and a notification on the inbox channel makes idle listeners look. A bus
-- whose connection was replaced adopts its previous session's waits (sets their pid
-- to its new backend) and wait_reply adopts the wait it takes over, so a waiter that
-- reconnects within the grace keeps its reply. Waits from before this migration have
-- no holder to check: they are forgotten after msgbus.config.dedup_retention.
--
-- listen calls forget_orphaned_waits when it is idle with a message it cannot take
-- (at most once a second, with the bus's wait_grace) and when it vacuums the inbox;
-- msgbus.prune() calls it with the default grace and counts what it forgot.

alter table msgbus.waits
    add column pid integer,                  -- null: registered before version 9
    add column orphaned_at timestamptz;      -- when a cleanup first saw pid's session gone
-- a separate statement, so that the rows there now keep a null pid
alter table msgbus.waits alter column pid set default pg_catalog.pg_backend_pid();

-- Forget the waits whose session has been gone for `grace` (see above); returns how
-- many. Safe to call from several sessions at once.
create function msgbus.forget_orphaned_waits(grace interval default interval '1 minute') returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off
as $$
declare
    live integer[];
    gone uuid[];
begin
    if grace is null or grace < interval '0' then
        raise exception 'msgbus: forget_orphaned_waits needs a grace of zero or more, not %',
            coalesce(grace::text, 'null') using errcode = '22023';
    end if;
    -- pg_stat_activity is read once per transaction and then kept: read it afresh, or
    -- a session that started since would look gone
    perform pg_stat_clear_snapshot();
    live := array(select a.pid from pg_stat_activity a where a.pid is not null);
    update msgbus.waits w set orphaned_at = null
     where w.orphaned_at is not null and w.pid = any (live);
    update msgbus.waits w set orphaned_at = now()
     where w.orphaned_at is null and w.pid is not null and w.pid <> all (live);
    -- orphaned_at <= (not <): with a grace of 0, what the statement above just marked
    with forgotten as (
        delete from msgbus.waits w
         where w.orphaned_at <= now() - grace
            or (w.pid is null and w.since < now() - (select c.dedup_retention from msgbus.config c))
        returning w.id)
    select coalesce(array_agg(id), '{}') into gone from forgotten;
    if exists (select 1 from msgbus.inbox i where i.reply = any (gone)) then
        -- a reply of theirs is in the inbox and may be handed out now
        perform pg_notify('msgbus_' || msgbus.service(), '');
    end if;
    return cardinality(gone);
end $$;

revoke all on function msgbus.forget_orphaned_waits(interval) from public;

-- Also forget waits whose holder is gone (with the default grace); counts them with
-- the message ids it forgot.
create or replace function msgbus.prune() returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    n bigint;
begin
    perform msgbus.settle_early_acks();
    delete from msgbus.seen s
     where s.received_at < now() - (select dedup_retention from msgbus.config)
       and not exists (select 1 from msgbus.inbox i where i.id = s.id);
    get diagnostics n = row_count;
    return n + msgbus.forget_orphaned_waits();
end $$;

-- The application's group role: wait_reply's registration adopts a wait (an upsert
-- that sets its holder), a reconnected bus adopts its previous session's waits, and
-- listen forgets orphaned ones.
create or replace function msgbus.app_role(name text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    role constant text := format('msgbus_%s_app', msgbus.check_service(name));
begin
    if not exists (select 1 from pg_roles where rolname = role) then
        execute format('create role %I nologin', role);
    end if;
    execute format('grant usage on schema msgbus to %I', role);
    execute format('grant insert, select (id) on msgbus.messages to %I', role);
    execute format('grant select on msgbus.inbox, msgbus.dead_letters to %I', role);
    execute format('grant insert, delete, select (id, pid), update (pid, orphaned_at) on msgbus.waits to %I', role);
    execute format('grant execute on function msgbus.service(), msgbus.send(text, text, jsonb, uuid), '
                   'msgbus.reply(uuid, text, jsonb), msgbus.claim(), msgbus.done(uuid), '
                   'msgbus.claim_batch(integer), msgbus.done_many(uuid[]), '
                   'msgbus.fail(uuid, text, integer), msgbus.take_reply(uuid), msgbus.acked(uuid), '
                   'msgbus.latency(msgbus.messages), msgbus.next_due(), '
                   'msgbus.forget_orphaned_waits(interval) to %I', role);
end $$;

do $$
begin
    if exists (select 1 from msgbus.config) then
        perform msgbus.app_role(service) from msgbus.config;
    end if;
end $$;
