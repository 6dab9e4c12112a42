-- msgbus schema, version 1.
--
-- One table, msgbus.messages, partitioned by receiver. In a service's database the
-- partition named after a peer (msgbus.to_<peer>) is its outbox to that peer and is
-- published; the peer subscribes, so the rows land in the peer's partition of the
-- same name, which is the peer's inbox. The inbox trigger acknowledges each arrival
-- by writing an ack into its own outbox and deleting it in the same transaction: the
-- replication slot, not the table, carries it (publications publish inserts only).
-- When the ack arrives back, the sender deletes the original from its outbox, so
-- everything still in an outbox is exactly what is not yet acknowledged.
--
-- The setup helper runs this file once, in one transaction, under an advisory lock,
-- and records it in msgbus.migrations. Per-service objects (the inbox, peers) are
-- made by msgbus.configure() and msgbus.add_peer() below.

create table msgbus.config (
    singleton boolean primary key default true check (singleton),
    service text not null check (service ~ '^[a-z][a-z0-9_]{0,23}$'),
    -- how long an inbox remembers a message id to ignore a resent copy of it
    dedup_retention interval not null default interval '7 days',
    installed_at timestamptz not null default now()
);

create table msgbus.peers (
    service text primary key check (service ~ '^[a-z][a-z0-9_]{0,23}$'),
    linked_at timestamptz not null default now()
);

create table msgbus.messages (
    id uuid not null default gen_random_uuid(),
    -- the message this one answers (replies and acks)
    reply uuid,
    sender text not null,                 -- default set by msgbus.configure()
    receiver text not null,
    type text not null,
    data jsonb not null default '{}',
    sent_at timestamptz not null default now(),
    not_before timestamptz,               -- not handed to a handler before (send's delay)
    expires_at timestamptz,               -- dead-lettered as "expired" if not handled by then (ttl)
    -- the rest is the receiver's bookkeeping, set by the inbox trigger
    received_at timestamptz,
    pos bigint,                           -- arrival order in the inbox
    available_at timestamptz,             -- not handed out before (retry backoff)
    attempts integer not null default 0,
    last_error text,
    constraint messages_names check (
        sender ~ '^[a-z][a-z0-9_]{0,23}$' and receiver ~ '^[a-z][a-z0-9_]{0,23}$'),
    constraint messages_type check (
        type ~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$'
        and (type !~ '^msgbus\.' or (type = 'msgbus.ack' and reply is not null))),
    constraint messages_data check (jsonb_typeof(data) = 'object'),
    -- id first: wait_ack finds a message by id alone in every outbox
    primary key (id, receiver)
) partition by list (receiver);

-- Rows for a receiver that has no partition land here and are refused with a clear
-- error, instead of PostgreSQL's "no partition of relation found for row".
create table msgbus.unrouted partition of msgbus.messages default;

-- Message ids an inbox has already taken, so that a resent copy is acked, not handled.
create table msgbus.seen (
    id uuid primary key,
    sender text not null,
    received_at timestamptz not null default now()
);
create index seen_received_at on msgbus.seen using brin (received_at);

-- Acks that arrived before the message they acknowledge was visible here. Logical
-- decoding sends a transaction once its commit record is flushed, a moment before
-- other sessions see it, so a fast peer's ack can find nothing to delete. The message
-- counts as acknowledged; the next ack that arrives (or msgbus.prune) removes both.
create table msgbus.early_acks (
    id uuid primary key,
    receiver text not null,
    at timestamptz not null default now()
);

-- Replies that a wait_reply call is waiting for: listen does not hand them out.
create table msgbus.waits (
    id uuid primary key,
    since timestamptz not null default now()
);

create table msgbus.dead_letters (
    id uuid primary key,
    reply uuid,
    sender text not null,
    receiver text not null,
    type text not null,
    data jsonb not null,
    sent_at timestamptz not null,
    received_at timestamptz,
    attempts integer not null,
    last_error text,
    reason text not null,
    died_at timestamptz not null default now()
);

create sequence msgbus.inbox_pos;

create function msgbus.on_unrouted() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    raise exception 'msgbus: unknown receiver "%": no service of that name is linked to this one', new.receiver
        using errcode = 'MB001',
              hint = 'link the two services with msgbus.setup.link (or "msgbus link") first';
end $$;

create trigger unrouted before insert on msgbus.unrouted
    for each row execute function msgbus.on_unrouted();

-- Delete the messages whose ack came early (see msgbus.early_acks) and forget those
-- acks; an early ack older than the dedup retention was for a message this service
-- never had (or removed otherwise).
create function msgbus.settle_early_acks() returns bigint
language plpgsql set search_path = pg_catalog, pg_temp set enable_seqscan = off set jit = off as $$
declare
    n bigint;
begin
    with settled as (
        delete from msgbus.messages m using msgbus.early_acks e
         where m.id = e.id and m.receiver = e.receiver
        returning m.id)
    delete from msgbus.early_acks e
     where e.id in (select id from settled)
        or e.at < now() - (select dedup_retention from msgbus.config);
    get diagnostics n = row_count;
    return n;
end $$;

-- Everything that arrives in the inbox. It runs in the apply worker, where an error
-- would stop all delivery from the sender: it must not raise for anything a sender
-- could have written, so what fails validation goes to the dead letters instead.
create function msgbus.on_arrival() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
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
        delete from msgbus.messages where id = new.reply and receiver = new.sender;
        if not found then
            insert into msgbus.early_acks (id, receiver) values (new.reply, new.sender)
            on conflict (id) do nothing;
        elsif exists (select 1 from msgbus.early_acks) then
            perform msgbus.settle_early_acks();
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

-- Name checks shared by the functions below.
create function msgbus.check_service(name text) returns text
language plpgsql immutable set search_path = pg_catalog, pg_temp as $$
begin
    if name is null or name !~ '^[a-z][a-z0-9_]{0,23}$' then
        raise exception 'msgbus: invalid service name %: use 1 to 24 lowercase letters, digits or _, starting with a letter',
            coalesce(quote_literal(name), 'NULL') using errcode = '22023';
    end if;
    return name;
end $$;

create function msgbus.service() returns text
language sql stable set search_path = pg_catalog, pg_temp as $$
    select service from msgbus.config
$$;

-- Make this database the home of service `name`: its inbox, the view msgbus.inbox on
-- it, and the default sender. Safe to call again with the same name.
create function msgbus.configure(name text) returns void
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
    end if;
    inbox := 'to_' || name;
    execute format('alter table msgbus.messages alter column sender set default %L', name);
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

-- The group role msgbus_<service>_app: what a service's application user needs to
-- send, consume and reply (grant it to the login role the application uses), without
-- owning the schema. The protocol functions run as the schema owner.
create function msgbus.app_role(name text) returns void
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
    execute format('grant insert, delete on msgbus.waits to %I', role);
    execute format('grant execute on function msgbus.service(), msgbus.send(text, text, jsonb, uuid), '
                   'msgbus.reply(uuid, text, jsonb), msgbus.claim(), msgbus.done(uuid), '
                   'msgbus.fail(uuid, text, integer), msgbus.take_reply(uuid), msgbus.acked(uuid), '
                   'msgbus.latency(msgbus.messages), msgbus.next_due() to %I', role);
end $$;

-- The publishing half of a link to `peer`: the outbox partition and its publication.
create function msgbus.add_peer(peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    me constant text := msgbus.service();
    outbox constant text := 'to_' || peer;
begin
    perform msgbus.check_service(peer);
    if me is null then
        raise exception 'msgbus: this database has no msgbus service installed' using errcode = 'MB004';
    end if;
    if peer = me then
        raise exception 'msgbus: service "%" cannot be linked to itself', me using errcode = 'MB002';
    end if;
    insert into msgbus.peers (service) values (peer) on conflict do nothing;
    if to_regclass(format('msgbus.%I', outbox)) is null then
        execute format('create table msgbus.%I partition of msgbus.messages for values in (%L)', outbox, peer);
        -- rows of an outbox are this service's own sends and acks, never someone else's
        execute format('alter table msgbus.%I add constraint %I check (sender = %L)',
                       outbox, outbox || '_sender', me);
    end if;
    if not exists (select 1 from pg_publication where pubname = 'msgbus_' || outbox) then
        execute format('create publication %I for table msgbus.%I with (publish = %L)',
                       'msgbus_' || outbox, outbox, 'insert');
    end if;
end $$;

-- Remove the publishing half of a link; refuses while messages to the peer are unacked
-- unless `force` is true.
create function msgbus.remove_peer(peer text, force boolean default false) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := 'to_' || msgbus.check_service(peer);
    pending bigint := 0;
begin
    if to_regclass(format('msgbus.%I', outbox)) is not null then
        perform msgbus.settle_early_acks();
        execute format('select count(*) from msgbus.%I', outbox) into pending;
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

-- Put every unacknowledged message to `peer` through the slot again (after a slot was
-- lost or a link rebuilt). The receiver ignores the copies it already has.
create function msgbus.resend(peer text) returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    outbox constant text := 'to_' || msgbus.check_service(peer);
    n bigint;
begin
    -- delete and insert again in two statements: a copy of a row is only published
    -- when it is inserted, and a unique check must not see the old row
    perform msgbus.settle_early_acks();
    execute format('create temp table msgbus_resend on commit drop as select * from msgbus.%I', outbox);
    execute format('delete from msgbus.%I', outbox);
    execute format('insert into msgbus.%I select * from msgbus_resend order by sent_at', outbox);
    get diagnostics n = row_count;
    drop table msgbus_resend;
    return n;
end $$;

-- Forget ids of messages older than the retention that are no longer in the inbox.
create function msgbus.prune() returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    n bigint;
begin
    perform msgbus.settle_early_acks();
    delete from msgbus.seen s
     where s.received_at < now() - (select dedup_retention from msgbus.config)
       and not exists (select 1 from msgbus.inbox i where i.id = s.id);
    get diagnostics n = row_count;
    return n;
end $$;

-- The consuming protocol. A consumer runs, in one transaction:
--   select * from msgbus.claim();   -- the next message, locked for this transaction
--   ... its own work ...
--   select msgbus.done(id);         -- consumed: gone when the transaction commits
-- If the work fails, it rolls back and calls msgbus.fail(id, error, max_attempts).
-- Messages from one sender are handed out one at a time, in arrival order, so several
-- consumers can share an inbox without breaking any sender's order.
create function msgbus.claim() returns setof msgbus.messages
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    gone record;
begin
    -- messages past their ttl go to the dead letters first (the partial index on
    -- expires_at holds only messages sent with a ttl)
    for gone in select * from msgbus.inbox where expires_at < now() for update skip locked loop
        delete from msgbus.inbox where id = gone.id;
        insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at,
                                         attempts, last_error, reason)
        values (gone.id, gone.reply, gone.sender, gone.receiver, gone.type, gone.data, gone.sent_at,
                gone.received_at, gone.attempts, gone.last_error, 'expired')
        on conflict (id) do nothing;
    end loop;
    return query
    select m.*
      from msgbus.inbox m
     where m.available_at <= now()
       and (m.reply is null or not exists (select 1 from msgbus.waits w where w.id = m.reply))
       -- the oldest of its sender's messages (an index lookup on (sender, pos))
       and m.pos = (select min(e.pos) from msgbus.inbox e where e.sender = m.sender)
     order by m.pos
     limit 1
       for update skip locked;
end $$;

create function msgbus.done(message uuid) returns boolean
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    delete from msgbus.inbox where id = message;
    return found;
end $$;

-- A failed attempt: count it, back off, and after max_attempts move the message to
-- the dead letters so that the messages behind it go on. Returns true when it died.
create function msgbus.fail(message uuid, error text, max_attempts integer default 5) returns boolean
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    m msgbus.messages;
begin
    update msgbus.inbox
       set attempts = attempts + 1,
           last_error = left(error, 2000),
           available_at = now() + least(interval '30 seconds', interval '50 milliseconds' * power(2, attempts))
     where id = message
    returning * into m;
    if not found or m.attempts < max_attempts then
        return false;
    end if;
    delete from msgbus.inbox where id = message;
    insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at,
                                     attempts, last_error, reason)
    values (m.id, m.reply, m.sender, m.receiver, m.type, m.data, m.sent_at, m.received_at,
            m.attempts, m.last_error, 'failed')
    on conflict (id) do update set attempts = excluded.attempts, last_error = excluded.last_error,
                                   died_at = now();
    return true;
end $$;

-- Take the reply to `message` out of the inbox, if it is there.
create function msgbus.take_reply(message uuid) returns setof msgbus.messages
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    target bigint;
begin
    select pos into target from msgbus.inbox where reply = message limit 1 for update skip locked;
    if found then
        delete from msgbus.waits where id = message;
        return query delete from msgbus.inbox where pos = target returning *;
    end if;
end $$;

-- Whether `message`, sent by this service, has been acknowledged: acked messages
-- leave the outbox, so any id not in an outbox counts as acknowledged.
create function msgbus.acked(message uuid) returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select exists (select 1 from msgbus.early_acks e where e.id = message)
        or not exists (
        select 1 from msgbus.messages m
         where m.id = message and m.receiver <> (select service from msgbus.config))
$$;

-- Seconds until the earliest message held back (retry backoff, delay) comes due, or
-- null when none is.
create function msgbus.next_due() returns float8
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    return (select extract(epoch from min(available_at) - now())::float8 from msgbus.inbox);
end $$;

-- Put a dead letter back into the inbox, at the end of the queue.
create function msgbus.redeliver(message uuid) returns boolean
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    d msgbus.dead_letters;
begin
    delete from msgbus.dead_letters where id = message returning * into d;
    if not found then
        return false;
    end if;
    -- the inbox trigger refuses local inserts (sends to self) but this one
    perform set_config('msgbus.redeliver', 'on', true);
    insert into msgbus.messages (id, reply, sender, receiver, type, data, sent_at)
    values (d.id, d.reply, d.sender, d.receiver, d.type, d.data, d.sent_at);
    perform set_config('msgbus.redeliver', '', true);
    return true;
end $$;

-- The replication role a peer uses to read its outbox here: it can log in for
-- replication and read msgbus.to_<peer>, nothing else. `verifier` is a SCRAM verifier
-- made by the client, so the clear password never reaches the server.
create function msgbus.peer_role(role text, verifier text, peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    perform msgbus.check_service(peer);
    if role !~ '^msgbus_[a-z0-9_]+$' or verifier !~ '^SCRAM-SHA-256\$' then
        raise exception 'msgbus: invalid role name or password verifier' using errcode = '22023';
    end if;
    if exists (select 1 from pg_roles where rolname = role) then
        execute format('alter role %I with login replication nosuperuser nocreatedb nocreaterole password %L',
                       role, verifier);
    else
        execute format('create role %I with login replication nosuperuser nocreatedb nocreaterole password %L',
                       role, verifier);
    end if;
    execute format('grant connect on database %I to %I', current_database(), role);
    execute format('grant usage on schema msgbus to %I', role);
    execute format('grant select on msgbus.%I to %I', 'to_' || peer, role);
end $$;

create function msgbus.drop_peer_role(role text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    if role !~ '^msgbus_[a-z0-9_]+$' then
        raise exception 'msgbus: invalid role name %', quote_literal(role) using errcode = '22023';
    end if;
    if exists (select 1 from pg_roles where rolname = role) then
        execute format('drop owned by %I', role);
        -- the role may still hold CONNECT on this database's own entry
        execute format('revoke all on database %I from %I', current_database(), role);
        execute format('drop role %I', role);
    end if;
end $$;

-- The subscribing half of a link: receive what `peer` publishes for this service.
-- The slot is made beforehand on the peer's side (create_slot = false), which is what
-- lets two databases of one cluster link without CREATE SUBSCRIPTION hanging; no
-- initial copy, since a copy would fire the inbox trigger for old rows; and a
-- synchronous commit per applied transaction, so that the ack it writes is flushed
-- and sent back at once instead of after the WAL writer's next round.
create function msgbus.subscribe(peer text, conninfo text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    me constant text := msgbus.service();
    sub constant text := format('msgbus_%s_to_%s', msgbus.check_service(peer), me);
begin
    if exists (select 1 from pg_subscription where subname = sub) then
        execute format('alter subscription %I connection %L', sub, conninfo);
        execute format('alter subscription %I enable', sub);
    else
        execute format('create subscription %I connection %L publication %I with ('
                       'create_slot = false, slot_name = %L, copy_data = false, '
                       'synchronous_commit = %L, binary = true)',
                       sub, conninfo, 'msgbus_to_' || me, sub, 'on');
    end if;
end $$;

-- Drop the subscription to `peer` without touching the peer's slot (the setup helper
-- drops it on the peer's side): works even when the peer is unreachable.
create function msgbus.unsubscribe(peer text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    sub constant text := format('msgbus_%s_to_%s', msgbus.check_service(peer), msgbus.service());
begin
    if exists (select 1 from pg_subscription where subname = sub) then
        execute format('alter subscription %I disable', sub);
        execute format('alter subscription %I set (slot_name = none)', sub);
        execute format('drop subscription %I', sub);
    end if;
end $$;

-- Sending from SQL: the same insert bus:send does (a plain INSERT into
-- msgbus.messages works as well).
create function msgbus.send(receiver text, type text, data jsonb default '{}', reply uuid default null)
returns uuid language sql set search_path = pg_catalog, pg_temp as $$
    insert into msgbus.messages (receiver, type, data, reply) values ($1, $2, $3, $4) returning id
$$;

-- Reply to inbox message `message` (typically the one this transaction claimed).
create function msgbus.reply(message uuid, type text, data jsonb default '{}') returns uuid
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    to_whom text;
begin
    select sender into to_whom from msgbus.inbox where id = message;
    if not found then
        raise exception 'msgbus: message % is not in the inbox', message using errcode = 'MB006';
    end if;
    return msgbus.send(to_whom, type, data, message);
end $$;

-- How long a message took from its sender's commit to this inbox:
--   select m.*, msgbus.latency(m) from msgbus.messages m where receiver = msgbus.service();
create function msgbus.latency(m msgbus.messages) returns interval
language sql stable set search_path = pg_catalog, pg_temp as $$
    select m.received_at - m.sent_at
$$;

-- Plans of these functions are cached for the session, and a plan made while a
-- table was empty would scan it sequentially for ever after (the seed's acks took 67 s
-- for 50,000 messages that way). Every statement on the message path has an index
-- to use, so forbid the planner anything else there, whatever the table's size. That
-- makes every plan look costly, so turn off JIT, which would compile each of them.
alter function msgbus.on_arrival() set enable_seqscan = off set jit = off;
alter function msgbus.claim() set enable_seqscan = off set jit = off;
alter function msgbus.done(uuid) set enable_seqscan = off set jit = off;
alter function msgbus.fail(uuid, text, integer) set enable_seqscan = off set jit = off;
alter function msgbus.take_reply(uuid) set enable_seqscan = off set jit = off;
alter function msgbus.acked(uuid) set enable_seqscan = off set jit = off;
alter function msgbus.next_due() set enable_seqscan = off set jit = off;
alter function msgbus.reply(uuid, text, jsonb) set enable_seqscan = off set jit = off;

alter function msgbus.claim() security definer;
alter function msgbus.done(uuid) security definer;
alter function msgbus.fail(uuid, text, integer) security definer;
alter function msgbus.take_reply(uuid) security definer;
alter function msgbus.acked(uuid) security definer;
alter function msgbus.next_due() security definer;
alter function msgbus.reply(uuid, text, jsonb) security definer;
alter function msgbus.service() security definer;

-- Functions are callable by PUBLIC unless revoked; only the owner and roles granted
-- explicitly may use msgbus's.
revoke all on all functions in schema msgbus from public;
