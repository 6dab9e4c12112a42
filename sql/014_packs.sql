-- msgbus schema, version 14: send_many travels as packs of messages.
--
-- Every message was a row of its own all the way: inserted into the outbox, decoded
-- by the walsender, applied by the receiver's apply worker, which ran the inbox
-- trigger (PL/pgSQL) once for it. The apply worker is where a batch spends its time:
-- 33-35 µs a message in a batch of 100,000, against 9 for rows into a table without
-- triggers, and PostgreSQL runs a row trigger for each applied row (statement
-- triggers do not fire for applied changes).
--
-- msgbus.send_many now writes the messages of one call as packs: rows of type
-- msgbus.pack, each carrying up to 1,000 messages of the call (and about a megabyte
-- of their data) as {"type": t, "ids": [...], "data": [...]}, one id and one data
-- object a message, in send order; delay and ttl are the pack row's not_before and
-- expires_at, the same for all of them, as send_many gives them. The inbox trigger
-- unpacks a pack with one statement for all of its messages: each becomes the inbox
-- row it would have been had it travelled alone (same id, sender, type, data,
-- not_before, expires_at, in order; sent_at is the pack's, the time of its insert,
-- where rows of one call had times microseconds apart), a copy seen before is dropped, a
-- message that fails validation goes to the dead letters with its own reason. The
-- receiver acknowledges the pack (its id), which removes it, and so all of its
-- messages, from the sender's outbox in one delete.
--
-- Measured with 100,000 messages in one transaction (send_many, 10,000 a call), on
-- dev clusters: commit -> all in the receiver's inbox 1.84-1.94 s with packs, 5.1 s
-- one row each; in `make bench`, 2.4-3.0 s against 4.1-4.3 before, and commit -> all
-- acked 2.6-3.2 s against 5.1-5.2 (a pack is acknowledged by one id, and the acks
-- of 100 packs travel as one row). The unpacking statement takes about 20 µs a
-- message in the receiving apply worker: the inbox row with its indexes about 12,
-- msgbus.seen 4.5, reading the pack's arrays and checking each id 2.5.
--
-- A message of a pack is not a row of the outbox, so msgbus.acked (wait_ack) also
-- looks for its id in the packs still there (a GIN index on the packs' ids), the
-- outbox's counts (status, unlink, remove_peer, resend) count a pack's messages, and
-- msgbus.redeliver refuses a pack that was dead-lettered whole (a pack that is not
-- one: no ids or data arrays of the same length).
--
-- A peer on an older version would take a pack for a message of an invalid type and
-- dead-letter it while acknowledging it: its messages would be lost to handlers. So a
-- service sends packs only to a peer that said it unpacks them (msgbus.peers.packs),
-- with the hello of version 12, whose data now says {"msgbus": 14}: this migration
-- sends it to every peer, and a receiver at 14 that learns a peer's version from it
-- answers once with its own, as before. Until then send_many sends one row a message.

-- Locks first, in the order the apply worker takes them (its inbox, then the rest), so
-- that a message arriving while this runs waits instead of deadlocking with it.
do $$
declare
    me constant text := (select service from msgbus.config);
begin
    if me is not null then
        execute format('lock table msgbus.%I in access exclusive mode', 'to_' || me);
    end if;
    lock table msgbus.messages, msgbus.peers in access exclusive mode;
end $$;

-- (if not exists, or replace: a service put back to an older version by hand, as
-- spec 22 does to stand in for an old peer, keeps what is below)
alter table msgbus.peers add column if not exists packs boolean not null default false;
comment on column msgbus.peers.packs is
    'the peer unpacks msgbus.pack rows (it said so with a hello of version 14 or later)';

-- wait_ack for a message of a pack: which pack still in an outbox carries its id.
-- Partial: the inbox and every other row pay only the predicate.
create index if not exists messages_pack_ids on msgbus.messages using gin ((data -> 'ids'))
    where type = 'msgbus.pack';

-- How many messages an outbox row stands for.
create or replace function msgbus.message_count(type text, data jsonb) returns integer
language sql immutable parallel safe set search_path = pg_catalog, pg_temp as $$
    select case when type = 'msgbus.pack' and jsonb_typeof(data -> 'ids') = 'array'
                then jsonb_array_length(data -> 'ids') else 1 end
$$;

revoke all on function msgbus.message_count(text, jsonb) from public;

-- The sender's check, for local inserts (see version 7): a pack is an object with a
-- valid message type, and arrays "ids" (UUIDs, none twice) and "data" (objects, each
-- valid as a message's data) of the same length, at least one.
create or replace function msgbus.valid_message(type text, reply uuid, data jsonb) returns boolean
language plpgsql immutable set search_path = pg_catalog, pg_temp as $$
declare
    bad integer;
    n integer;
begin
    if type = 'msgbus.ack' then
        if reply is null then
            raise exception 'msgbus: an ack must name the message it acknowledges'
                using errcode = '23514', constraint = 'messages_type';
        end if;
    elsif type = 'msgbus.pack' then
        if jsonb_typeof(data -> 'ids') is distinct from 'array' or jsonb_typeof(data -> 'data') is distinct from 'array'
           or jsonb_array_length(data -> 'ids') <> jsonb_array_length(data -> 'data')
           or jsonb_array_length(data -> 'ids') = 0 then
            raise exception 'msgbus: a pack needs arrays "ids" and "data" of the same length, at least one'
                using errcode = '23514', constraint = 'messages_data';
        end if;
        if jsonb_typeof(data -> 'type') is distinct from 'string'
           or data ->> 'type' !~ '^(?!msgbus\.)[A-Za-z][A-Za-z0-9_.:-]{0,62}$' then
            raise exception 'msgbus: invalid message type % in a pack', coalesce(quote_literal(data ->> 'type'), 'null')
                using errcode = '23514', constraint = 'messages_type';
        end if;
        select count(*) filter (where jsonb_typeof(i) <> 'string'
                                   or i #>> '{}' !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'),
               count(distinct i)
          into bad, n
          from jsonb_array_elements(data -> 'ids') i;
        if bad > 0 or n <> jsonb_array_length(data -> 'ids') then
            raise exception 'msgbus: the ids of a pack must be distinct UUIDs in lower case'
                using errcode = '23514', constraint = 'messages_data';
        end if;
        if exists (select 1 from jsonb_array_elements(data -> 'data') d where jsonb_typeof(d) <> 'object') then
            raise exception 'msgbus: message data must be a JSON object'
                using errcode = '23514', constraint = 'messages_data';
        end if;
        if jsonb_path_exists(data, 'strict $.data[*].**{1000}') then
            raise exception 'msgbus: message data is nested deeper than 1000 levels'
                using errcode = '23514', constraint = 'messages_data';
        end if;
        return true;
    elsif type is null or type !~ '^(?!msgbus\.)[A-Za-z][A-Za-z0-9_.:-]{0,62}$' then
        raise exception 'msgbus: invalid message type %', coalesce(quote_literal(type), 'null')
            using errcode = '23514', constraint = 'messages_type',
                  hint = '1 to 63 letters, digits or _ . : -, starting with a letter, not msgbus.*';
    end if;
    if jsonb_typeof(data) is distinct from 'object' then
        raise exception 'msgbus: message data must be a JSON object, not %', coalesce(jsonb_typeof(data), 'null')
            using errcode = '23514', constraint = 'messages_data';
    end if;
    if jsonb_path_exists(data, 'strict $.**{1000}') then
        raise exception 'msgbus: message data is nested deeper than 1000 levels'
            using errcode = '23514', constraint = 'messages_data';
    end if;
    return true;
end $$;

-- Messages to `receiver`, one of type `type` for each object of the JSON array `data`,
-- in one statement, in order: packed for a peer that unpacks (see above), one row a
-- message for any other. delay and ttl in seconds, or null. Returns the messages'
-- ids, in the order of `data`.
create or replace function msgbus.send_many(receiver text, type text, data jsonb, delay float8 default null,
                                 ttl float8 default null)
returns setof uuid
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    packed boolean;
begin
    if jsonb_typeof(data) is distinct from 'array' then
        raise exception 'msgbus: send_many takes a JSON array of data objects, not %', coalesce(jsonb_typeof(data), 'null')
            using errcode = '22023';
    end if;
    select p.packs into packed from msgbus.peers p where p.service = receiver;
    if not coalesce(packed, false) then
        -- an unknown receiver gets the error of a single send (msgbus.unrouted)
        return query
        insert into msgbus.messages (receiver, type, data, not_before, expires_at)
        select receiver, type, d, now() + make_interval(secs => delay), now() + make_interval(secs => ttl)
          from jsonb_array_elements(data) with ordinality as e(d, n)
         order by n
        returning id;
        return;
    end if;
    -- A pack ends after 1,000 messages, or where the data sent so far passes the next
    -- megabyte: (n - 1) / 1000 and the megabytes so far both grow with n, so each
    -- pair of them is one pack.
    return query
    with e as (
        select d, n,
               pg_catalog.encode(
                   pg_catalog.set_bit(pg_catalog.set_bit(
                       pg_catalog.overlay(
                           pg_catalog.uuid_send(pg_catalog.gen_random_uuid()),
                           pg_catalog.substr(pg_catalog.int8send(pg_catalog.floor(
                               pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())
                               operator(pg_catalog.*) 1000)::bigint), 3),
                           1, 6),
                       52, 1), 53, 1),
                   'hex')::uuid as id,
               (n - 1) / 1000 as by_count,
               (sum(pg_column_size(d)) over (order by n)) / 1048576 as by_size
          from jsonb_array_elements(data) with ordinality as e(d, n)),
    p as (
        select jsonb_build_object('type', type, 'ids', jsonb_agg(e.id order by e.n),
                                  'data', jsonb_agg(e.d order by e.n)) as pack,
               min(e.n) as first
          from e
         group by e.by_count, e.by_size),
    sent as (
        insert into msgbus.messages (receiver, type, data, not_before, expires_at)
        select receiver, 'msgbus.pack', p.pack, now() + make_interval(secs => delay),
               now() + make_interval(secs => ttl)
          from p
         order by p.first
        returning 1)
    select e.id from e order by e.n;
end $$;

revoke all on function msgbus.send_many(text, text, jsonb, float8, float8) from public;

-- True when the message is in no outbox, neither as a row nor in a pack, or its ack
-- (or its pack's) came before it was visible (msgbus.early_acks).
create or replace function msgbus.acked(message uuid) returns boolean
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
begin
    return exists (select 1 from msgbus.early_acks e where e.id = message)
        or not exists (
        select 1 from msgbus.messages m
         where m.id = message and m.receiver <> (select service from msgbus.config))
       and not exists (
        select 1 from msgbus.messages m
         where m.type = 'msgbus.pack' and (m.data -> 'ids') ? message::text
           and m.receiver <> (select service from msgbus.config)
           and not exists (select 1 from msgbus.early_acks e where e.id = m.id));
end $$;

-- Tell `peer` that this service takes msgbus.acks rows (12) and unpacks packs (14).
create or replace function msgbus.hello(peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    hello_id uuid := gen_random_uuid();
begin
    insert into msgbus.messages (id, reply, sender, receiver, type, data)
    values (hello_id, '00000000-0000-0000-0000-000000000000', msgbus.service(), peer,
            'msgbus.ack', '{"msgbus": 14}');
    delete from msgbus.messages where id = hello_id and receiver = peer;
end $$;

revoke all on function msgbus.hello(text) from public;

-- Counts of messages, not rows, in the outbox.
create or replace function msgbus.remove_peer(peer text, force boolean default false) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := 'to_' || msgbus.check_service(peer);
    pending bigint := 0;
begin
    if to_regclass(format('msgbus.%I', outbox)) is not null then
        perform msgbus.settle_early_acks();
        execute format('select coalesce(sum(msgbus.message_count(type, data)), 0) from msgbus.%I', outbox)
           into pending;
        if pending > 0 and not force then
            raise exception 'msgbus: % message(s) to "%" are not acknowledged yet', pending, peer
                using errcode = 'MB005',
                      hint = 'wait for them to be acknowledged, or unlink with force to discard them';
        end if;
    end if;
    execute format('drop publication if exists %I', 'msgbus_' || outbox);
    execute format('drop table if exists msgbus.%I', outbox);
    delete from msgbus.peers where service = peer;
    return pending;
end $$;

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
    select coalesce(sum(msgbus.message_count((m).type, (m).data)), 0) into n from msgbus_resend;
    drop table msgbus_resend;
    return n;
end $$;

-- A pack dead-lettered whole (not a pack: see msgbus.valid_message) has no message to
-- put back.
create or replace function msgbus.redeliver(message uuid) returns boolean
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    d msgbus.dead_letters;
begin
    delete from msgbus.dead_letters where id = message returning * into d;
    if not found then
        return false;
    end if;
    if d.type = 'msgbus.pack' then
        raise exception 'msgbus: dead letter % is a malformed pack of messages, which cannot be redelivered', message
            using errcode = 'MB006', hint = 'read its data and send its messages again, then delete it';
    end if;
    -- the inbox trigger refuses local inserts (sends to self) but this one
    perform set_config('msgbus.redeliver', 'on', true);
    insert into msgbus.messages (id, reply, sender, receiver, type, data, sent_at)
    values (d.id, d.reply, d.sender, d.receiver, d.type, d.data, d.sent_at);
    perform set_config('msgbus.redeliver', '', true);
    return true;
end $$;

-- The application's group role may also send_many.
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
                   'msgbus.send_many(text, text, jsonb, float8, float8), '
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

-- The inbox trigger: packs, and the hello of version 14.
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
    version numeric;
    changed boolean := false;
    unpacked bigint;
    ptype text;
    pwhy text;
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
            -- a hello: what the peer takes (12: msgbus.acks; 14: packs); answer the
            -- first one that tells something new with ours
            if jsonb_typeof(new.data -> 'msgbus') = 'number' then
                version := (new.data ->> 'msgbus')::numeric;
                if version >= 12 then
                    update msgbus.peers set batched_acks = true
                     where service = new.sender and not batched_acks;
                    changed := found;
                end if;
                if version >= 14 then
                    update msgbus.peers set packs = true
                     where service = new.sender and not packs;
                    changed := changed or found;
                end if;
                if changed then
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
    elsif new.type = 'msgbus.pack' then
        if jsonb_typeof(new.data -> 'ids') is distinct from 'array'
           or jsonb_typeof(new.data -> 'data') is distinct from 'array'
           or jsonb_array_length(new.data -> 'ids') <> jsonb_array_length(new.data -> 'data') then
            why := 'not a pack of messages';
        end if;
    elsif new.type !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$' or starts_with(new.type, 'msgbus.') then
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
    elsif new.type = 'msgbus.pack' then
        -- Each message of the pack as the inbox row it would be had it come alone, in
        -- one statement: ids that are not UUIDs name no message (dropped, as a
        -- message without an id); the first of a repeated id counts; a message that
        -- fails validation goes to the dead letters; one seen before is dropped.
        -- (the type is read here once: the statement below uses it for every message)
        ptype := new.data ->> 'type';
        if jsonb_typeof(new.data -> 'type') is distinct from 'string'
           or ptype !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$' or starts_with(ptype, 'msgbus.') then
            pwhy := 'invalid type';
        end if;
        perform set_config('msgbus.unpacking', 'on', true);
        -- (A plain insert into msgbus.seen, for the ids it did not have when the
        -- statement began: one apply worker brings a sender's messages, and an id
        -- inserted meanwhile by another would make this transaction fail and be
        -- applied again, then as a copy seen before. ON CONFLICT cost 3 µs more a
        -- message.)
        with e as (
            select x.id, x.data, x.n,
                   case when pwhy is not null then pwhy
                        when jsonb_typeof(x.data) <> 'object' then 'data is not a JSON object'
                        when jsonb_path_exists(x.data, 'strict $.**{1000}') then 'data nested deeper than 1000 levels'
                   end as why,
                   not exists (select 1 from msgbus.seen s where s.id = x.id) as fresh
              from (select distinct on (y.id) y.id, y.data, y.n
                      from (select i::uuid as id, d as data, n
                              from rows from (jsonb_array_elements_text(new.data -> 'ids'),
                                        jsonb_array_elements(new.data -> 'data'))
                                   with ordinality as r(i, d, n)
                             where i ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') y
                     order by y.id, y.n) x),
        dead as (
            insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at, attempts, reason)
            select e.id, null, new.sender, me, coalesce(ptype, 'msgbus.pack'), e.data, new.sent_at, now(), 0, e.why
              from e where e.why is not null
            on conflict (id) do nothing),
        seen as (
            insert into msgbus.seen (id, sender)
            select e.id, new.sender from e where e.why is null and e.fresh)
        insert into msgbus.messages (id, sender, receiver, type, data, sent_at, not_before, expires_at,
                                     received_at, pos, available_at, attempts)
        select e.id, new.sender, me, ptype, e.data, new.sent_at, new.not_before, new.expires_at,
               now(), nextval('msgbus.inbox_pos'), greatest(now(), new.not_before), 0
          from (select e.* from e where e.why is null and e.fresh order by e.n) e;
        get diagnostics unpacked = row_count;
        perform set_config('msgbus.unpacking', 'off', true);
        if unpacked > 0 then
            perform pg_notify('msgbus_' || me, '');
        end if;
        -- not stored itself: acknowledged below, as a message
        why := 'unpacked';
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
        if octet_length(pending) >= 3699 then   -- 100 ids (36 bytes each, and commas)
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

-- The messages of a pack are inserted into the inbox by the trigger itself (above),
-- which must not run again for each of them: its WHEN clause skips it while a pack
-- is unpacked, a test the executor makes without calling PL/pgSQL (a call that
-- returned at once cost 7 µs a message). configure makes new inboxes that way.
create or replace function msgbus.arrival_trigger(inbox text, me text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    execute format('drop trigger if exists arrival on msgbus.%I', inbox);
    execute format('create trigger arrival before insert on msgbus.%I for each row '
                   'when (pg_catalog.current_setting(''msgbus.unpacking'', true) is distinct from ''on'') '
                   'execute function msgbus.on_arrival(%L)', inbox, me);
    -- the apply worker runs with session_replication_role = replica
    execute format('alter table msgbus.%I enable always trigger arrival', inbox);
end $$;

revoke all on function msgbus.arrival_trigger(text, text) from public;

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
        perform msgbus.arrival_trigger(inbox, name);
        execute format('create view msgbus.inbox as select * from msgbus.%I', inbox);
    end if;
    perform msgbus.app_role(name);
end $$;

do $$
declare
    me constant text := (select service from msgbus.config);
begin
    if me is not null and to_regclass(format('msgbus.%I', 'to_' || me)) is not null then
        perform msgbus.arrival_trigger('to_' || me, me);
    end if;
end $$;

-- Tell every peer: a peer at 14 starts sending packs here, and answers.
do $$
begin
    if exists (select 1 from msgbus.config) then
        perform msgbus.hello(service) from msgbus.peers;
    end if;
end $$;
