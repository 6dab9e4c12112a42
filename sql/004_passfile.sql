-- msgbus schema, version 4: subscriptions that read their password from a passfile.
--
-- By default a subscription keeps its peer's password in its connection string,
-- that is in pg_subscription.subconninfo (readable by superusers only, and copied by
-- pg_dump). With setup.link's `passfile_dir` the password goes into a file on the
-- subscriber's server instead, one per subscription, and the connection string
-- names the file (`passfile=...`). It is written as the server's own user, mode 0600
-- (libpq ignores a passfile others can read; a plain COPY TO file makes it 0644), by
-- a shell command whose only variable part is the path checked below.

-- Write `line` (a passfile entry for a msgbus replication role, or '' to blank the
-- file) to `path`. Only what the setup helper writes is accepted, so the function is
-- no general way to write files; owner only.
create function msgbus.write_passfile(path text, line text) returns void
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    if path !~ '^/[A-Za-z0-9_./-]+/msgbus_[a-z0-9_]+\.pgpass$' or path ~ '/\.\./' then
        raise exception 'msgbus: invalid passfile path %', quote_literal(path)
            using errcode = '22023', hint = 'an absolute path to msgbus_<publisher>_to_<subscriber>.pgpass';
    end if;
    if line <> '' and line !~ '^\*:\*:\*:msgbus_[a-z0-9_]+:[0-9a-f]{32,}$' then
        raise exception 'msgbus: invalid passfile entry' using errcode = '22023';
    end if;
    -- a new file each time, renamed over the old one
    execute format('copy (select %L) to program %L', line,
                   format('umask 077 && cat > %s.new && mv -f %s.new %s', path, path, path));
end $$;

revoke all on function msgbus.write_passfile(text, text) from public;
