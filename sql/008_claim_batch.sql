-- msgbus schema, version 8: a batch of messages claimed and consumed in one call each.
--
-- listen { batch = n } took each message of a batch with its own claim() and done()
-- (a round trip each, and claim's expiry check and index walk each time): about 140
-- µs of server time and 250 µs of wall time a message. claim_batch(n) takes up to n
-- messages in one call and done_many(ids) consumes them in one statement.
--
-- claim_batch hands messages out on the terms claim() does, so that consumers that
-- mix the two keep every sender's order: walking the inbox in arrival order, a message
-- is taken when it is available, is not a reply that a wait_reply call is waiting
-- for, and every older message of its sender is already in this batch (claim() asks
-- the same with an empty batch: the sender's oldest). A message locked by another
-- consumer is skipped, and so, through the last condition, is everything its sender
-- sent after it. Each message taken is locked until the transaction ends. Each step
-- of the walk starts after the last message taken: a message passed over stays
-- ineligible for the rest of the call (now() does not move in a transaction, and
-- what blocked it is still there), so the walk never goes back.
--
-- The caller hands the messages to its handler in the order returned; a message whose
-- handler fails is not consumed, and the caller must then leave the rest of that
-- sender's messages in this batch alone (they stay in the inbox, and are unlocked
-- when the transaction ends), as listen does.

create function msgbus.claim_batch(n integer) returns setof msgbus.messages
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set enable_sort = off set jit = off
set plan_cache_mode = force_generic_plan
as $$
declare
    gone record;
    m msgbus.messages;
    taken bigint[] := '{}';
    last bigint := -1;
begin
    if n is null or n < 1 or n > 1000 then
        raise exception 'msgbus: claim_batch takes from 1 to 1000 messages, not %', coalesce(n::text, 'null')
            using errcode = '22023';
    end if;
    -- messages past their ttl go to the dead letters first, as in claim()
    for gone in select * from msgbus.inbox where expires_at < now() for update skip locked loop
        delete from msgbus.inbox where id = gone.id;
        insert into msgbus.dead_letters (id, reply, sender, receiver, type, data, sent_at, received_at,
                                         attempts, last_error, reason)
        values (gone.id, gone.reply, gone.sender, gone.receiver, gone.type, gone.data, gone.sent_at,
                gone.received_at, gone.attempts, gone.last_error, 'expired')
        on conflict (id) do nothing;
    end loop;
    while cardinality(taken) < n loop
        select i.* into m
          from msgbus.inbox i
         where i.pos > last
           and i.available_at <= now()
           and (i.reply is null or not exists (select 1 from msgbus.waits w where w.id = i.reply))
           -- every older message of its sender is in this batch (an index walk on
           -- (sender, pos) over at most the batch so far)
           and not exists (select 1 from msgbus.inbox e
                            where e.sender = i.sender and e.pos < i.pos and e.pos <> all (taken))
         order by i.pos
         limit 1
           for update skip locked;
        exit when not found;
        taken := taken || m.pos;
        last := m.pos;
        return next m;
    end loop;
end $$;

-- Consume the messages of a claim_batch whose handlers succeeded: gone when the
-- transaction commits. Returns how many there were.
create function msgbus.done_many(messages uuid[]) returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set jit = off set plan_cache_mode = force_generic_plan
as $$
declare
    k bigint;
begin
    delete from msgbus.inbox where id = any (messages);
    get diagnostics k = row_count;
    return k;
end $$;

revoke all on function msgbus.claim_batch(integer), msgbus.done_many(uuid[]) from public;

-- The application's group role may call them too.
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
    execute format('grant insert, delete on msgbus.waits to %I', role);
    execute format('grant execute on function msgbus.service(), msgbus.send(text, text, jsonb, uuid), '
                   'msgbus.reply(uuid, text, jsonb), msgbus.claim(), msgbus.done(uuid), '
                   'msgbus.claim_batch(integer), msgbus.done_many(uuid[]), '
                   'msgbus.fail(uuid, text, integer), msgbus.take_reply(uuid), msgbus.acked(uuid), '
                   'msgbus.latency(msgbus.messages), msgbus.next_due() to %I', role);
end $$;

do $$
begin
    if exists (select 1 from msgbus.config) then
        perform msgbus.app_role(service) from msgbus.config;
    end if;
end $$;
