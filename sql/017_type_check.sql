-- msgbus schema, version 17: the sender's check of a message type costs a fraction.
--
-- Every row a service sends passes msgbus.valid_message (the check constraint
-- messages_valid), and it tested the type with one regular expression,
-- '^(?!msgbus\.)[A-Za-z][A-Za-z0-9_.:-]{0,62}$'. PostgreSQL's regular expressions
-- build the automaton of such a pattern as they match: a bounded repeat ({0,62})
-- makes it large, and the lookahead makes it run twice, on every call. That one
-- test was about a fifth of the server's work for a one-message send (callgrind,
-- PostgreSQL in single-user mode, 1,000 single-row inserts into msgbus.messages, each
-- its own transaction: 353,000 instructions an insert with it, 286,000 with the test
-- below, 196,000 with no check at all); 5 to 10 µs a call in a loop of them.
--
-- The rule is the same (1 to 63 characters, a letter first, then letters, digits or
-- _ . : -, and not msgbus.*), written as a pattern without a bounded repeat or a
-- lookahead, a length and a prefix test: 0.2 to 0.6 µs.

-- The sender's check, for local inserts (see version 7): as in version 14, but for
-- its two tests of a type (the message's, and a pack's).
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
           or data ->> 'type' !~ '^[A-Za-z][A-Za-z0-9_.:-]*$' or length(data ->> 'type') > 63
           or starts_with(data ->> 'type', 'msgbus.') then
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
    elsif type is null or type !~ '^[A-Za-z][A-Za-z0-9_.:-]*$' or length(type) > 63 or starts_with(type, 'msgbus.') then
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
