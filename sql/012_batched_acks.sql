-- msgbus schema, version 12: one ack row for many messages.
--
-- The inbox trigger acknowledged every arriving message with an ack row of its own:
-- an insert into the outbox back to the sender and a delete (the slot, not the
-- table, carries it), a row to decode and send, and on the sender a row to apply
-- with a trigger call. Measured with 20,000 messages in one transaction, switching
-- batched_acks between rounds on the same clusters: the receiving apply worker took
-- 75-98 µs a message before and 38-53 after, the sender's 19-28 µs an ack before and
-- 5 after; commit to all acked went from 2.1-2.7 s to 1.1-1.3 s.
--
-- Now the first message of an arriving transaction still gets its own ack row at
-- once, as before (one message a transaction, the latency path, is unchanged). The
-- ids of the messages after it are collected and go back as one row of type
-- msgbus.acks, data {"ids": [...]}, for every 100 messages and for the rest when the
-- transaction commits (a deferred trigger on msgbus.ack_flush, queued once). The
-- acks still commit with the messages they acknowledge, in the same transaction.
--
-- A peer on an older version would not understand msgbus.acks (it would keep the
-- messages in its outbox for ever), so a receiver sends them only to a peer that
-- said it takes them: msgbus.peers.batched_acks. A service says so with a hello, an
-- ordinary ack whose reply is the nil UUID and whose data is {"msgbus": 12}: sent to
-- every peer by this migration and by msgbus.setup.link. A version 12 receiver
-- records it, and answers with its own hello the first time, so that whichever side
-- upgrades first, both know once both have. An older receiver takes the hello for an
-- ack that came before its message (msgbus.early_acks) and forgets it after
-- dedup_retention; until then each ack it takes looks at that table once more.

alter table msgbus.peers add column batched_acks boolean not null default false;
comment on column msgbus.peers.batched_acks is
    'the peer takes one msgbus.acks row for many messages (it said so with a hello)';

-- A row inserted here once in an arriving transaction of several messages queues the
-- deferred trigger that sends the acks still collected when the transaction commits,
-- from `sender` (this service) to `receiver`. The row itself is deleted at once: the
-- queued trigger fires all the same, with the row as it was.
create unlogged table msgbus.ack_flush (sender text not null, receiver text not null);

-- Send one msgbus.acks row from `me` to `peer` for the comma-separated ids `ids`.
create function msgbus.send_acks(me text, peer text, ids text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    ack_id uuid := gen_random_uuid();
begin
    insert into msgbus.messages (id, sender, receiver, type, data)
    values (ack_id, me, peer, 'msgbus.acks',
            jsonb_build_object('ids', to_jsonb(string_to_array(ids, ','))));
    delete from msgbus.messages where id = ack_id and receiver = peer;
end $$;

create function msgbus.on_ack_flush() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    pending constant text := current_setting('msgbus.pending_acks', true);
begin
    if pending is not null and pending <> '' then
        perform msgbus.send_acks(new.sender, new.receiver, pending);
        perform set_config('msgbus.pending_acks', '', true);
    end if;
    return null;
end $$;

create constraint trigger flush after insert on msgbus.ack_flush
    deferrable initially deferred
    for each row execute function msgbus.on_ack_flush();
-- it fires in the apply worker, which runs with session_replication_role = replica
alter table msgbus.ack_flush enable always trigger flush;

-- Tell `peer` that this service takes msgbus.acks rows (see above).
create function msgbus.hello(peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    hello_id uuid := gen_random_uuid();
begin
    insert into msgbus.messages (id, reply, sender, receiver, type, data)
    values (hello_id, '00000000-0000-0000-0000-000000000000', msgbus.service(), peer,
            'msgbus.ack', '{"msgbus": 12}');
    delete from msgbus.messages where id = hello_id and receiver = peer;
end $$;

revoke all on function msgbus.send_acks(text, text, text), msgbus.on_ack_flush(), msgbus.hello(text) from public;

-- Early acks (msgbus.early_acks: an ack that came before its message was visible
-- here) were settled by every ack that arrived while any was kept: a join of all of
-- them with the outbox, for each ack. An early ack whose message never shows up
-- (the second ack of a message resent after a repair, which the first ack already
-- removed) stays for dedup_retention, so after a repair that resent many messages
-- every ack cost as much as their number: 7.6 ms an ack with 60,000 of them kept,
-- measured. A message shows up a moment after its ack came early, so an arriving
-- ack now settles only the early acks of the last minute (an index on `at`);
-- msgbus.prune() still settles all of them (for a commit that stayed invisible
-- longer, such as one waiting for a synchronous standby), and msgbus.acked counts
-- an early ack as an ack whatever its age.
create index early_acks_at on msgbus.early_acks (at);

create function msgbus.settle_recent_early_acks() returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    n bigint;
begin
    with settled as (
        delete from msgbus.messages m using msgbus.early_acks e
         where e.at > now() - interval '1 minute' and m.id = e.id and m.receiver = e.receiver
        returning m.id)
    delete from msgbus.early_acks e where e.id in (select id from settled);
    get diagnostics n = row_count;
    return n;
end $$;

revoke all on function msgbus.settle_recent_early_acks() from public;

-- msgbus.configure ran on every install, and altered the messages table every time
-- (the sender's default): a lock on every partition, taken while the apply worker
-- may hold the inbox and wait for the table to write an ack, which deadlocked an
-- upgrade whenever a message or a hello arrived during it. The default is set once,
-- when the service is first configured; it never changes after.
create or replace function msgbus.configure(name text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    current text;
    inbox text;
begin
    perform msgbus.check_service(name);
    select service into current from msgbus.config;
    if current is not null and current <> name then
        raise exception 'msgbus: this database is already the service "%", not "%"', current, name
            using errcode = 'MB003';
    end if;
    if current is null then
        insert into msgbus.config (service) values (name);
        execute format('alter table msgbus.messages alter column sender set default %L', name);
    end if;
    inbox := 'to_' || name;
    if to_regclass(format('msgbus.%I', inbox)) is null then
        execute format('create table msgbus.%I partition of msgbus.messages for values in (%L)', inbox, name);
        execute format('create index %I on msgbus.%I (pos)', inbox || '_pos', inbox);
        execute format('create index %I on msgbus.%I (sender, pos)', inbox || '_sender_pos', inbox);
        execute format('create index %I on msgbus.%I (reply) where reply is not null', inbox || '_reply', inbox);
        execute format('create index %I on msgbus.%I (expires_at) where expires_at is not null',
                       inbox || '_expires_at', inbox);
        execute format('create index %I on msgbus.%I (available_at)', inbox || '_available_at', inbox);
        execute format('create trigger arrival before insert on msgbus.%I for each row execute function msgbus.on_arrival(%L)',
                       inbox, name);
        -- the apply worker runs with session_replication_role = replica
        execute format('alter table msgbus.%I enable always trigger arrival', inbox);
        execute format('create view msgbus.inbox as select * from msgbus.%I', inbox);
    end if;
    perform msgbus.app_role(name);
end $$;

-- The inbox trigger once more: msgbus.acks and the hello (above), and the ack
-- channel names a message. wait_ack, woken by a notification on
-- msgbus_<service>_ack, asked the database whether its message was acknowledged
-- (msgbus.acked): one more round trip on the latency path, after the ack was known
-- already. The notification of the first ack in each transaction of acks now carries
-- its message's id as the payload; later ones stay unnamed and fold into one, so a
-- transaction of many acks from an older peer brings one notification more, not one
-- each. A waiter that sees its id returns at once: a notification is delivered only
-- once the transaction that removed the message from the outbox has committed.

create or replace function msgbus.on_arrival() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    me constant text := tg_argv[0];
    -- what this transaction has acknowledged so far: null or '' nothing (or acks
    -- only); a sender's name: that sender's first message, with an ack row of its
    -- own; the name and '+': the ids of its later messages are being collected, and
    -- msgbus.ack_flush is queued. (One subscription brings one sender's messages.)
    acked constant text := current_setting('msgbus.tx_acks', true);
    ack_id uuid;
    why text;
    batched boolean;
    pending text;
    ids uuid[];
    early bigint;
    flush_row tid;
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

    if new.type = 'msgbus.ack' or new.type = 'msgbus.acks' then
        -- an ack that names no message (or no sender) acknowledges nothing; taking it
        -- would raise below and stop the subscription
        if new.sender is null then
            return null;
        end if;
        if new.type = 'msgbus.acks' then
            -- ids that are not UUIDs acknowledge nothing (a cast would raise)
            if jsonb_typeof(new.data -> 'ids') = 'array' then
                ids := array(
                    select x::uuid from jsonb_array_elements_text(new.data -> 'ids') x
                     where x ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$');
            end if;
            if cardinality(ids) > 0 then
                with gone as (
                    delete from msgbus.messages m
                     where m.id = any(ids) and m.receiver = new.sender
                    returning m.id)
                insert into msgbus.early_acks (id, receiver)
                select u.id, new.sender from unnest(ids) u(id)
                 where u.id not in (select id from gone)
                on conflict (id) do nothing;
                get diagnostics early = row_count;
                if early = 0 and exists (select 1 from msgbus.early_acks where at > now() - interval '1 minute') then
                    perform msgbus.settle_recent_early_acks();
                end if;
            end if;
        elsif new.reply is null then
            return null;
        elsif new.reply = '00000000-0000-0000-0000-000000000000' then
            -- a hello: the peer takes msgbus.acks; answer the first one with ours
            if jsonb_typeof(new.data -> 'msgbus') = 'number' and (new.data ->> 'msgbus')::numeric >= 12 then
                update msgbus.peers set batched_acks = true
                 where service = new.sender and not batched_acks;
                if found then
                    perform msgbus.hello(new.sender);
                end if;
            end if;
            return null;
        else
            delete from msgbus.messages where id = new.reply and receiver = new.sender;
            if not found then
                insert into msgbus.early_acks (id, receiver) values (new.reply, new.sender)
                on conflict (id) do nothing;
            elsif exists (select 1 from msgbus.early_acks where at > now() - interval '1 minute') then
                perform msgbus.settle_recent_early_acks();
            end if;
        end if;
        -- acks only so far: no need to wait for the fsync (see version 7)
        if acked is null or acked = '' then
            perform set_config('synchronous_commit', 'off', true);
        end if;
        -- The first ack of a transaction names its message: a wait_ack for it returns
        -- on the notification, without asking. The others fold into one, unnamed.
        if new.type = 'msgbus.ack' and current_setting('msgbus.ack_named', true) is distinct from 'on' then
            perform set_config('msgbus.ack_named', 'on', true);
            perform pg_notify('msgbus_' || me || '_ack', new.reply::text);
        else
            perform pg_notify('msgbus_' || me || '_ack', '');
        end if;
        return null;
    end if;

    -- An ack can only go back to a linked peer (its outbox partition must exist).
    if new.sender is not null then
        select p.batched_acks into batched from msgbus.peers p where p.service = new.sender;
    end if;
    if batched is null then
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

    if batched and (acked = new.sender or acked = new.sender || '+') then
        -- Not the first message of the transaction, and the sender takes msgbus.acks:
        -- collect its id.
        if acked = new.sender then
            perform set_config('msgbus.tx_acks', new.sender || '+', true);
            insert into msgbus.ack_flush (sender, receiver) values (me, new.sender)
            returning ctid into flush_row;
            delete from msgbus.ack_flush where ctid = flush_row;
        end if;
        pending := coalesce(nullif(current_setting('msgbus.pending_acks', true), '') || ',', '')
                   || new.id::text;
        if length(pending) >= 3699 then   -- 100 ids (36 characters each, and commas)
            perform msgbus.send_acks(me, new.sender, pending);
            pending := '';
        end if;
        perform set_config('msgbus.pending_acks', pending, true);
    else
        -- This transaction writes an ack that must travel: commit it synchronously,
        -- even if an ack earlier in the same transaction turned that off.
        if acked is null or acked = '' then
            perform set_config('msgbus.tx_acks', new.sender, true);
            if current_setting('synchronous_commit') = 'off' then
                perform set_config('synchronous_commit', 'on', true);
            end if;
        end if;
        -- Acknowledge: the insert travels through the slot, the delete does not.
        ack_id := gen_random_uuid();
        insert into msgbus.messages (id, reply, sender, receiver, type)
        values (ack_id, new.id, me, new.sender, 'msgbus.ack');
        delete from msgbus.messages where id = ack_id and receiver = new.sender;
    end if;

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

-- Say hello to every peer linked already, and forget a hello that came from a peer
-- while this service was on an older version (it is in msgbus.early_acks).
select msgbus.hello(service) from msgbus.peers order by service;
delete from msgbus.early_acks where id = '00000000-0000-0000-0000-000000000000';
