-- msgbus schema, version 3: claim() keeps one plan whatever the inbox's statistics.
--
-- claim() runs with enable_seqscan off, but a plan made while the inbox's statistics
-- were stale (a backlog that arrived faster than autovacuum analyzes) still picked a
-- bitmap scan of every available message plus a sort, then tested each for being
-- its sender's oldest: 8 ms a claim at a backlog of 5,000, seconds at 100,000. The
-- only plan that stays cheap is a walk of the inbox in arrival order (the pos index)
-- that stops at the first message that is its sender's oldest and not locked by
-- another consumer, with that test an index lookup on (sender, pos). Say so to the
-- planner: no bitmap scans and no sorts in claim(), and a sub-select whose order is
-- exactly the (sender, pos) index.
create or replace function msgbus.claim() returns setof msgbus.messages
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off set enable_bitmapscan = off set enable_sort = off set jit = off
as $$
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
       -- the oldest of its sender's messages: the first entry of the (sender, pos) index
       and m.pos = (select e.pos from msgbus.inbox e where e.sender = m.sender
                     order by e.sender, e.pos limit 1)
     order by m.pos
     limit 1
       for update skip locked;
end $$;
