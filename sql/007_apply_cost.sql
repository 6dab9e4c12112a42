-- msgbus schema, version 7: less work per message in the apply workers.
--
-- 1. A transaction of acks does not wait for its fsync.
--
-- Subscriptions commit synchronously (msgbus.subscribe): the ack a receiver writes
-- for a message must be flushed before its walsender can send it back, and waiting
-- for the WAL writer instead costs up to wal_writer_delay per message. A transaction
-- that brings only acks writes nothing that travels on, yet it waited for an fsync
-- too, and wait_ack waits for that commit. The inbox trigger now makes such a
-- transaction commit asynchronously (SET LOCAL synchronous_commit = off); a
-- transaction that also brings a message keeps the synchronous commit.
--
-- Nothing is lost or doubled by this: the apply worker reports a remote position as
-- done only once the local commit that applied it is flushed, so a crash before the
-- flush loses the ack's effect (the outbox row is back) and its origin progress
-- together, and the peer streams the ack again, which deletes the row again. The
-- receipt itself was committed synchronously on the receiver before the ack left.
-- Measured on send -> wait_ack, one message at a time: p50 2.7-2.9 ms before, 2.2-2.3
-- ms after (the raw baseline's ack subscription gets the same setting in bench/).
--
-- 2. Arriving rows are checked once, by the inbox trigger.
--
-- The check constraint messages_valid called msgbus.valid_message (PL/pgSQL, with a
-- regular expression and a walk of the data) for every row inserted, including every
-- row the apply worker inserts: each arriving message, which the inbox trigger has
-- just validated itself (and dead-lettered if bad), and each ack the trigger writes.
-- In the receiver's apply worker that was about a tenth of its CPU a message (perf:
-- ExecConstraints 11 %). Rows inserted under session_replication_role = replica
-- (the apply worker, or a superuser who sets it) now skip the call; every local
-- send, and msgbus.redeliver, is checked as before. Only a superuser can set
-- session_replication_role.
--
-- Also: an arriving ack with no reply or no sender made the trigger raise (not-null
-- violation in msgbus.early_acks), which stops the subscription and everything behind
-- it. msgbus's own check never lets such an ack out, but a peer's schema may lack it:
-- the trigger now ignores such an ack.

alter table msgbus.messages
    drop constraint messages_valid,
    add constraint messages_valid check (
        pg_catalog.current_setting('session_replication_role') = 'replica'
        or msgbus.valid_message(type, reply, data));

create or replace function msgbus.on_arrival() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    me constant text := tg_argv[0];
    ack_id uuid;
    why text;
begin
    if current_setting('session_replication_role') <> 'replica' then
        if current_setting('msgbus.redeliver', true) = 'on' then
            -- msgbus.redeliver() putting a dead letter back: no ack, no dedup
            new.received_at := now();
            new.pos := nextval('msgbus.inbox_pos');
            new.available_at := now();
            new.attempts := 0;
            perform pg_notify('msgbus_' || me, '');
            return new;
        end if;
        raise exception 'msgbus: service "%" cannot send to itself', me
            using errcode = 'MB002';
    end if;

    if new.type = 'msgbus.ack' then
        -- an ack that names no message (or no sender) acknowledges nothing; taking it
        -- would raise below and stop the subscription
        if new.reply is null or new.sender is null then
            return null;
        end if;
        delete from msgbus.messages where id = new.reply and receiver = new.sender;
        if not found then
            insert into msgbus.early_acks (id, receiver) values (new.reply, new.sender)
            on conflict (id) do nothing;
        elsif exists (select 1 from msgbus.early_acks) then
            perform msgbus.settle_early_acks();
        end if;
        -- acks only so far: no need to wait for the fsync (see above)
        if current_setting('msgbus.apply_brought_message', true) is distinct from 'on' then
            perform set_config('synchronous_commit', 'off', true);
        end if;
        perform pg_notify('msgbus_' || me || '_ack', '');
        return null;
    end if;

    -- An ack can only go back to a linked peer (its outbox partition must exist).
    if new.sender is null or not exists (select 1 from msgbus.peers p where p.service = new.sender) then
        why := 'unknown sender';
    elsif new.id is null or new.type is null or new.data is null or new.sent_at is null then
        why := 'missing field';
    elsif new.type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$' or new.type ~ '^msgbus\.' then
        why := 'invalid type';
    elsif jsonb_typeof(new.data) <> 'object' then
        why := 'data is not a JSON object';
    elsif jsonb_path_exists(new.data, 'strict $.**{1000}') then
        -- deeper than a receiver decodes (MSGBUS_JSON_MAX_DEPTH): 0.4 µs a message
        why := 'data nested deeper than 1000 levels';
    end if;

    if why is not null then
        if new.id is not null and new.sender is not null and new.type is not null and new.data is not null then
            insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at, attempts, reason)
            values (new.id, new.reply, new.sender, me, new.type, new.data, coalesce(new.sent_at, now()), now(), 0, why)
            on conflict (id) do nothing;
        end if;
        if why = 'unknown sender' or new.id is null then
            return null;
        end if;
    else
        insert into msgbus.seen (id, sender) values (new.id, new.sender) on conflict (id) do nothing;
        if not found then
            why := 'duplicate';
        end if;
    end if;

    -- This transaction writes an ack that must travel: commit it synchronously, even
    -- if an ack earlier in the same transaction turned that off.
    perform set_config('msgbus.apply_brought_message', 'on', true);
    if current_setting('synchronous_commit') = 'off' then
        perform set_config('synchronous_commit', 'on', true);
    end if;

    -- Acknowledge: the insert travels through the slot, the delete does not.
    ack_id := gen_random_uuid();
    insert into msgbus.messages (id, reply, sender, receiver, type)
    values (ack_id, new.id, me, new.sender, 'msgbus.ack');
    delete from msgbus.messages where id = ack_id and receiver = new.sender;

    if why is not null then
        return null;
    end if;

    new.received_at := now();
    new.pos := nextval('msgbus.inbox_pos');
    new.available_at := greatest(now(), new.not_before);
    new.attempts := 0;
    new.last_error := null;
    perform pg_notify('msgbus_' || me, '');
    if new.reply is not null then
        perform pg_notify('msgbus_' || me || '_reply', '');
    end if;
    return new;
end $$;
