-- msgbus schema, version 16: the first reply of a transaction names its message.
--
-- Every reply to a service notified its reply channel with an empty payload, so each
-- bus of the service that waited for a reply (one per web worker, say) looked for its
-- own in the inbox on every reply to any of them: with n waiting, n lookups a reply.
-- As the ack channel does since version 12, the first reply of a transaction now
-- notifies with the id of the message it answers (the id wait_reply waits on), and
-- the transaction's other replies fold into one notification with an empty payload,
-- so that a transaction of many replies still sends at most two. wait_reply looks
-- only on a notification that names its message or is empty (and after a reconnect,
-- every few seconds and at its timeout). A bus of an older version, which looks on
-- every reply notification, is served as before.
--
-- msgbus.on_arrival as in version 15, but for the reply notification at its end (a
-- migration that changes a function restates it whole).

-- The inbox trigger: a whole pack is stored as one row (version 15); the first
-- reply of a transaction names its message (version 16).
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
        -- The first reply of a transaction names the message it answers: a
        -- wait_reply for another one need not look. The others fold into one.
        if current_setting('msgbus.reply_named', true) is distinct from 'on' then
            perform set_config('msgbus.reply_named', 'on', true);
            perform pg_notify('msgbus_' || me || '_reply', new.reply::text);
        else
            perform pg_notify('msgbus_' || me || '_reply', '');
        end if;
    end if;
    return new;
end $$;
