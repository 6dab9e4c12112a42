-- msgbus schema, version 15: a pack waits in the inbox as one row.
--
-- Version 14 unpacked a pack in the inbox trigger: each of its messages became an
-- inbox row, with its indexes and its msgbus.seen entry, in the receiver's apply
-- worker, about 20 µs a message. A batch of 100,000 sent in one transaction becomes
-- visible when its one apply transaction commits, so that time came before the first
-- message could be handled: commit -> all in the inbox took 2.2-3.2 times what the
-- same rows take to replicate into a table without triggers.
--
-- A pack that is whole (a valid type; ids that are distinct lower-case UUIDs, the
-- first not seen before; data objects no deeper than a receiver decodes) is now
-- stored as it came: one inbox row of type msgbus.pack, deduplicated by its own id
-- (which msgbus.resend and a repaired slot send again unchanged) and acknowledged by
-- it, as before. Any other pack is unpacked on arrival as in version 14, so that its
-- bad messages go to the dead letters one by one.
--
-- The messages of a stored pack are handed out by msgbus.claim_batch whole: a pack
-- is a batch of its own, its messages made from the row (same ids, type, data,
-- sent_at, not_before, expires_at as had they been unpacked), and msgbus.done_many
-- deletes the row when it is given all of their ids, in order. A pack with more
-- messages than the batch may take is split into packs of the batch's size
-- (msgbus.split_pack), and the first of them is the batch. Whatever needs the
-- messages as rows unpacks the pack first (msgbus.unpack): claim, which hands out
-- one message at a time (and claim_batch(1)); done_many when it is given only some
-- of them (the batch stopped early); done and fail when given one of them (reply
-- only reads the pack's sender). A pack is split or unpacked only when it is the
-- oldest of its sender's inbox rows (the claims reach it only then; done_many, fail
-- and done only for a pack claim_batch handed out in the same transaction), and its
-- messages take positions below every position the sequence gives (-1024 * the
-- pack's position + their place in it, 1 to 1000; a part of a pack has its first
-- message's), in pack order: they keep their place before the sender's later
-- messages, and positions stay unique.
--
-- msgbus.acked (wait_ack) finds a message of a pack in an outbox with a GIN index on
-- the packs' ids, which was on every partition of msgbus.messages: the inbox's
-- stored packs would have paid for it, 2.4 µs a message in the apply worker (100,000
-- messages: 760-790 ms of its CPU with it, 525-545 without). It now holds only rows
-- with no received_at, which the inbox trigger sets on every row it stores.
--
-- The inbox view shows a stored pack as its row; msgbus.message_count(type, data)
-- counts its messages (status does). Expired packs go to the dead letters message by
-- message, as "expired". The wire format is the same: senders need not know.
--
-- Measured with make bench (100,000 messages in one transaction, five runs): commit
-- -> all in the inbox 0.29-0.30 s in four runs, 0.75 in one (2.4-3.0 s with version
-- 14), -> all consumed with listen { batch = 1000 } 0.93-1.12 s (3.3-4.4 s), with
-- batch = 50 3.2-3.5 s splitting (5.1-6.6 s).

-- Locks first, in the order the apply worker takes them (see version 14).
do $$
declare
    me constant text := (select service from msgbus.config);
begin
    if me is not null then
        execute format('lock table msgbus.%I in access exclusive mode', 'to_' || me);
    end if;
    lock table msgbus.messages, msgbus.seen in access exclusive mode;
end $$;

drop index if exists msgbus.messages_pack_ids;
create index messages_pack_ids on msgbus.messages using gin ((data -> 'ids'))
    where type = 'msgbus.pack' and received_at is null;

-- As version 14's, with the index's predicate.
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
         where m.type = 'msgbus.pack' and m.received_at is null and (m.data -> 'ids') ? message::text
           and m.receiver <> (select service from msgbus.config)
           and not exists (select 1 from msgbus.early_acks e where e.id = m.id));
end $$;

-- Whether an arriving pack can be stored as it came (see above). The caller has
-- checked that "ids" and "data" are arrays of the same length. About 1.5 µs a
-- message (the checks one by one in SQL, as the unpacking statement makes them, 3.3).
create or replace function msgbus.whole_pack(pack jsonb) returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    ids constant jsonb := pack -> 'ids';
    k constant integer := jsonb_array_length(pack -> 'ids');
begin
    if jsonb_typeof(pack -> 'type') is distinct from 'string'
       or pack ->> 'type' !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,62}$' or starts_with(pack ->> 'type', 'msgbus.')
       or k = 0 then
        return false;
    end if;
    -- every id a UUID in lower case: one match over the array's text, where each is
    -- 38 characters with its quotes and 2 more separate them (any other text of the
    -- array, which only another form of it could give, is unpacked instead)
    if octet_length(ids::text) <> 40 * k
       or ids::text !~ '^\["[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"(, "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")*\]$' then
        return false;
    end if;
    if jsonb_path_exists(pack, 'strict $.data[*] ? (@.type() != "object")')
       or jsonb_path_exists(pack, 'strict $.data[*].**{1000}') then
        return false;
    end if;
    if (select count(distinct i::uuid) from jsonb_array_elements_text(ids) i) <> k then
        return false;
    end if;
    -- a pack that version 14 unpacked here, sent again: its first message was seen
    -- (14 inserted every id of a valid pack into msgbus.seen)
    return not exists (select 1 from msgbus.seen s where s.id = (ids ->> 0)::uuid);
end $$;

-- The position of the first message of stored pack `p` once unpacked (see above): a
-- pack that arrived has a position from the sequence, and its messages go to the
-- 1,000 positions below -1024 times it; a part of a pack (msgbus.split_pack) has the
-- position of its first message.
create or replace function msgbus.pack_base(p msgbus.messages) returns bigint
language sql immutable set search_path = pg_catalog, pg_temp as $$
    select case when p.pos > 0 then p.pos * -1024 + 1 else p.pos end
$$;

-- The messages of stored pack `p`, in order, as the inbox rows they would be unpacked:
-- their ids, type and data, the pack's sender, times and availability, positions
-- from its place. The parts of p.data are taken out into variables once: each use of
-- p.data in a statement reads it from its compressed form, and each -> on it copies
-- the part (a pack of a megabyte: 2.5 and 4.5 ms).
create or replace function msgbus.pack_messages(p msgbus.messages) returns setof msgbus.messages
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    pdata constant jsonb := p.data;
    ptype constant text := pdata ->> 'type';
    pids constant jsonb := pdata -> 'ids';
    pmsgs constant jsonb := pdata -> 'data';
    base constant bigint := msgbus.pack_base(p);
begin
    return query
    select r.i::uuid, null::uuid, p.sender, p.receiver, ptype, r.d, p.sent_at, p.not_before, p.expires_at,
           p.received_at, base + r.n - 1, p.available_at, 0, null::text
      from rows from (jsonb_array_elements_text(pids), jsonb_array_elements(pmsgs))
           with ordinality as r(i, d, n)
     order by r.n;
end $$;

-- The messages of stored pack `p` as inbox rows, in its place (see above), and the
-- pack gone. Returns how many. An id already in the inbox is not inserted twice.
create or replace function msgbus.unpack(p msgbus.messages) returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    k bigint;
begin
    -- the inbox trigger's WHEN clause skips these rows
    perform set_config('msgbus.unpacking', 'on', true);
    insert into msgbus.messages
    select * from msgbus.pack_messages(p)
    on conflict (id, receiver) do nothing;
    get diagnostics k = row_count;
    perform set_config('msgbus.unpacking', 'off', true);
    delete from msgbus.inbox where id = p.id and type = 'msgbus.pack';
    return k;
end $$;

-- Stored pack `p` as packs of `size` messages (the last may have fewer), in its place:
-- each has the position its first message would have unpacked, and an id of its own
-- (a local row: msgbus.seen has the pack's). For a batch smaller than the pack, which
-- then takes the first of them whole, as it takes a pack that fits: the messages do
-- not become inbox rows (100,000 through listen { batch = 50 }: see the README's
-- Performance). Returns how many packs.
create or replace function msgbus.split_pack(p msgbus.messages, size integer) returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    k integer;
    base constant bigint := msgbus.pack_base(p);
begin
    delete from msgbus.inbox where id = p.id and type = 'msgbus.pack';
    perform set_config('msgbus.unpacking', 'on', true);
    insert into msgbus.messages (id, sender, receiver, type, data, sent_at, not_before, expires_at,
                                 received_at, pos, available_at, attempts)
    select gen_random_uuid(), p.sender, p.receiver, 'msgbus.pack',
           jsonb_build_object('type', m.type, 'ids', jsonb_agg(m.id order by m.pos),
                              'data', jsonb_agg(m.data order by m.pos)),
           p.sent_at, p.not_before, p.expires_at, p.received_at, min(m.pos), p.available_at, 0
      from msgbus.pack_messages(p) m
     group by m.type, (m.pos - base) / size;
    get diagnostics k = row_count;
    perform set_config('msgbus.unpacking', 'off', true);
    return k;
end $$;

-- The stored pack that claim_batch handed out in this transaction and that holds
-- message `message`, locked; null if none.
create or replace function msgbus.claimed_pack(message uuid) returns msgbus.messages
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    p msgbus.messages;
begin
    select i.* into p
      from msgbus.inbox i
     where i.pos = any (string_to_array(nullif(current_setting('msgbus.claimed_packs', true), ''), ',')::bigint[])
       and i.type = 'msgbus.pack'
       and (i.data -> 'ids') ? message::text
     limit 1
       for update;
    return p;
end $$;

-- Messages past their ttl to the dead letters, as "expired"; a stored pack's one by one.
create or replace function msgbus.expire() returns void
language plpgsql
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set enable_sort = off set jit = off
set plan_cache_mode = force_generic_plan
as $$
declare
    gone msgbus.messages;
begin
    -- the partial index on expires_at holds only messages sent with a ttl
    for gone in select * from msgbus.inbox where expires_at < now() for update skip locked loop
        delete from msgbus.inbox where id = gone.id;
        if gone.type = 'msgbus.pack' then
            insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at,
                                             attempts, last_error, reason)
            select m.id, m.reply, m.sender, m.receiver, m.type, m.data, m.sent_at, m.received_at,
                   m.attempts, m.last_error, 'expired'
              from msgbus.pack_messages(gone) m
            on conflict (id) do nothing;
        else
            insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at,
                                             attempts, last_error, reason)
            values (gone.id, gone.reply, gone.sender, gone.receiver, gone.type, gone.data, gone.sent_at,
                    gone.received_at, gone.attempts, gone.last_error, 'expired')
            on conflict (id) do nothing;
        end if;
    end loop;
end $$;

revoke all on function msgbus.whole_pack(jsonb), msgbus.pack_base(msgbus.messages),
                       msgbus.pack_messages(msgbus.messages), msgbus.unpack(msgbus.messages),
                       msgbus.split_pack(msgbus.messages, integer), msgbus.claimed_pack(uuid), msgbus.expire()
    from public;

-- One message: a stored pack that is the next is unpacked first.
create or replace function msgbus.claim() returns setof msgbus.messages
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set enable_sort = off set jit = off
as $$
declare
    m msgbus.messages;
begin
    perform msgbus.expire();
    loop
        select i.* into m
          from msgbus.inbox i
         where i.available_at <= now()
           and (i.reply is null or not exists (select 1 from msgbus.waits w where w.id = i.reply))
           -- the oldest of its sender's messages: the first entry of the (sender, pos) index
           and i.pos = (select e.pos from msgbus.inbox e where e.sender = i.sender
                         order by e.sender, e.pos limit 1)
         order by i.pos
         limit 1
           for update skip locked;
        if not found then
            return;
        elsif m.type <> 'msgbus.pack' then
            return next m;
            return;
        end if;
        perform msgbus.unpack(m);
    end loop;
end $$;

-- Version 10's walk, and stored packs: a pack is a batch of its own (its size is in
-- its data, which the walk does not read). Reached first, it is handed out whole when
-- it has at most n messages, else split into packs of n (unpacked for n = 1) and the
-- walk starts again; reached after other candidates, it waits for the next batch and
-- holds its sender's later ones.
create or replace function msgbus.claim_batch(n integer) returns setof msgbus.messages
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set enable_sort = off set jit = off
set plan_cache_mode = force_generic_plan
as $$
declare
    r record;
    m msgbus.messages;
    p msgbus.messages;
    taken bigint[] := '{}';
    blocked text[] := '{}';
    held text[] := '{}';
    cand bigint[];
    csender text[];
    j integer;
    skipped boolean;
    again boolean;
    pdata jsonb;
begin
    if n is null or n < 1 or n > 1000 then
        raise exception 'msgbus: claim_batch takes from 1 to 1000 messages, not %', coalesce(n::text, 'null')
            using errcode = '22023';
    end if;
    perform msgbus.expire();
    loop
        -- 1. a walk of the inbox in arrival order, without locks: each sender's
        -- messages up to the first one that is not ready
        cand := '{}';
        csender := '{}';
        again := false;
        for r in select i.pos, i.sender, i.type = 'msgbus.pack' as pack,
                        i.available_at <= now()
                        and (i.reply is null or not exists (select 1 from msgbus.waits w where w.id = i.reply)) as ready
                   from msgbus.inbox i
                  order by i.pos loop
            if r.sender = any (blocked) or r.sender = any (held) or r.pos = any (taken) then
                continue;
            elsif not r.ready then
                blocked := blocked || r.sender;
            elsif r.pack then
                -- (held, not blocked: the sender's candidates before the pack stay)
                if cardinality(cand) + cardinality(taken) > 0 then
                    held := held || r.sender;
                    continue;
                end if;
                select i.* into p from msgbus.inbox i
                 where i.pos = r.pos and i.type = 'msgbus.pack' and i.available_at <= now()
                   for update skip locked;
                if not found then
                    held := held || r.sender;
                    continue;
                end if;
                -- its data out of its compressed form once: for the size here, and in
                -- the record for pack_messages, split_pack or unpack below
                pdata := p.data;
                p.data := pdata;
                if jsonb_array_length(pdata -> 'ids') <= n then
                    -- done_many, done, fail and reply find its messages by this
                    perform set_config('msgbus.claimed_packs',
                                       concat_ws(',', nullif(current_setting('msgbus.claimed_packs', true), ''), p.pos),
                                       true);
                    return query select * from msgbus.pack_messages(p);
                    return;
                elsif n > 1 then
                    -- packs of n, the first of which the next walk takes
                    perform msgbus.split_pack(p, n);
                    again := true;
                    exit;
                else
                    perform msgbus.unpack(p);
                    again := true;
                    exit;
                end if;
            else
                cand := cand || r.pos;
                csender := csender || r.sender;
                exit when cardinality(cand) + cardinality(taken) >= n;
            end if;
        end loop;
        continue when again;
        exit when cardinality(cand) = 0;
        -- 2. lock the candidates in one statement; one that is not returned (another
        -- consumer has it, or it changed since) blocks the rest of its sender's
        j := 1;
        skipped := false;
        for m in select i.* from msgbus.inbox i
                  where i.pos = any (cand)
                    and i.available_at <= now()
                    and (i.reply is null or not exists (select 1 from msgbus.waits w where w.id = i.reply))
                  order by i.pos
                    for update skip locked loop
            while cand[j] < m.pos loop
                blocked := blocked || csender[j];
                skipped := true;
                j := j + 1;
            end loop;
            j := j + 1;
            if not (m.sender = any (blocked)) then
                taken := taken || m.pos;
                return next m;
            end if;
        end loop;
        -- the candidates after the last one returned were not returned either
        while j <= cardinality(cand) loop
            blocked := blocked || csender[j];
            skipped := true;
            j := j + 1;
        end loop;
        -- each walk after the first leaves out at least one more sender: one whose
        -- candidate was not returned was not left out before
        exit when not skipped or cardinality(taken) >= n;
    end loop;
end $$;

-- Consumed: plain rows by id; a pack claim_batch handed out in this transaction by
-- all of its ids in order (the row goes), or unpacked first when given only some.
create or replace function msgbus.done_many(messages uuid[]) returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    k bigint := 0;
    d bigint;
    p msgbus.messages;
    ids uuid[];
    at integer;
    claimed constant text := nullif(current_setting('msgbus.claimed_packs', true), '');
begin
    if claimed is not null and cardinality(messages) > 0 then
        for p in select i.* from msgbus.inbox i
                  where i.pos = any (string_to_array(claimed, ',')::bigint[]) and i.type = 'msgbus.pack'
                  order by i.pos
                    for update loop
            ids := array(select x::uuid from jsonb_array_elements_text(p.data -> 'ids') with ordinality as e(x, o)
                          order by e.o);
            at := array_position(messages, ids[1]);
            if at is not null and messages[at : at + cardinality(ids) - 1] = ids then
                delete from msgbus.inbox where id = p.id and type = 'msgbus.pack';
                k := k + cardinality(ids);
                messages := messages[: at - 1] || messages[at + cardinality(ids) :];
            elsif ids && messages then
                perform msgbus.unpack(p);
            end if;
        end loop;
    end if;
    delete from msgbus.inbox where id = any (messages) and type <> 'msgbus.pack';
    get diagnostics d = row_count;
    return k + d;
end $$;

create or replace function msgbus.done(message uuid) returns boolean
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    p msgbus.messages;
begin
    delete from msgbus.inbox where id = message and type <> 'msgbus.pack';
    if found then
        return true;
    end if;
    p := msgbus.claimed_pack(message);
    if p.id is null then
        return false;
    end if;
    perform msgbus.unpack(p);
    delete from msgbus.inbox where id = message;
    return found;
end $$;

-- As version 1's, for a message of a pack claim_batch handed out too (unpacked first).
create or replace function msgbus.fail(message uuid, error text, max_attempts integer default 5) returns boolean
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    m msgbus.messages;
    p msgbus.messages;
begin
    for pass in 1 .. 2 loop
        update msgbus.inbox
           set attempts = attempts + 1,
               last_error = left(error, 2000),
               available_at = now() + least(interval '30 seconds', interval '50 milliseconds' * power(2, attempts))
         where id = message and type <> 'msgbus.pack'
        returning * into m;
        exit when found or pass = 2;
        p := msgbus.claimed_pack(message);
        if p.id is null then
            return false;
        end if;
        perform msgbus.unpack(p);
    end loop;
    if m.id is null or m.attempts < max_attempts then
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

create or replace function msgbus.reply(message uuid, type text, data jsonb default '{}') returns uuid
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    to_whom text;
begin
    select i.sender into to_whom from msgbus.inbox i where i.id = message and i.type <> 'msgbus.pack';
    if not found then
        to_whom := (msgbus.claimed_pack(message)).sender;
        if to_whom is null then
            raise exception 'msgbus: message % is not in the inbox', message using errcode = 'MB006';
        end if;
    end if;
    return msgbus.send(to_whom, type, data, message);
end $$;

-- A pack's id in msgbus.seen is kept while the pack waits (a row with that id is in
-- the inbox, as for every message), and also while any part of it waits once split
-- or unpacked: those rows have the pack's received_at and a position below zero, and
-- the seen row was written in the same transaction, with the same received_at.
create or replace function msgbus.prune() returns bigint
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    n bigint;
begin
    perform msgbus.settle_early_acks();
    delete from msgbus.seen s
     where s.received_at < now() - (select dedup_retention from msgbus.config)
       and not exists (select 1 from msgbus.inbox i where i.id = s.id)
       and not exists (select 1 from msgbus.inbox i
                        where i.sender = s.sender and i.pos < 0 and i.received_at = s.received_at);
    get diagnostics n = row_count;
    return n + msgbus.forget_orphaned_waits();
end $$;

-- The inbox trigger: a whole pack is stored as one row (version 15).
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
        -- A pack sent again (msgbus.resend, a repaired slot) is a copy seen before.
        insert into msgbus.seen (id, sender) values (new.id, new.sender) on conflict (id) do nothing;
        if not found then
            why := 'duplicate';
        elsif msgbus.whole_pack(new.data) then
            -- stored as it came, one inbox row for all of its messages: claim_batch
            -- hands them out, claim and the other readers unpack it (msgbus.unpack)
            null;
        else
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
