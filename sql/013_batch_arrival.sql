-- msgbus schema, version 13: less work a message in the inbox trigger, in batches.
--
-- A profile of the receiving apply worker (perf, 20,000 messages in one transaction,
-- the path of migration 012 that collects the ids of a batch's acks) found two costs
-- that had nothing to do with the messages:
--
-- 1. The trigger checked the length of the collected ids with length(), which counts
--    the characters of a UTF-8 string one by one: up to 3,699 bytes read for every
--    message, 7 % of the apply worker's samples (textlen, with pg_mbstrlen_with_len
--    and pg_utf_mblen under it). The ids are ASCII, so their octet_length, which
--    reads none of them, is the same number.
-- 2. Two regular expressions ran on every message's type; the second only asked
--    whether it starts with "msgbus.", which starts_with answers without the regular
--    expression engine (the two took 5 % of the samples).
--
-- A/B on the same clusters, switching the function between rounds, 20,000 messages in
-- one transaction, five rounds each: the receiving apply worker 35.1-38.4 µs a
-- message before, 32.9-34.5 after. The trigger accepts and refuses exactly what it
-- did.

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

