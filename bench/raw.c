/*
 * raw: the baseline msgbus is measured against. Plain SQL over libpq, with the same
 * replication settings msgbus uses (binary, synchronous_commit = on, copy_data = false,
 * slots made first), in its own pair of databases:
 *
 *   sender (rawsend)                          receiver (rawrecv)
 *   raw_out   --- publication raw_pub --->     raw_out (+ pos; ALWAYS trigger: insert
 *   plain_out --- (same publication)  --->     plain_out            an ack, pg_notify)
 *   raw_ack   <--- publication ack_pub ---     raw_ack
 *   (ALWAYS trigger: pg_notify)
 *
 * and a third pair of tables for the same work with msgbus's guarantees, in plain SQL
 * ("exact"): a message is taken once however often it arrives, and its ack removes it
 * from the sender's table, so that what is left there is what has not arrived:
 *
 *   ex_out    --- publication raw_pub --->     ex_out (+ pos; ALWAYS trigger: ex_seen
 *                                              dedup, an ack row, pg_notify)
 *   ex_ack    <--- publication ack_pub ---     ex_ack (inserted and deleted at once: only
 *   (ALWAYS trigger: delete the ex_out row,    the insert travels)
 *    pg_notify; the ack is not kept)
 *
 * Every subcommand prints one line of numbers (seconds, counts) on stdout, which
 * bench/run.lua parses; errors go to stderr with exit status 1. Latencies are taken
 * with CLOCK_MONOTONIC, as msgbus's core.now() does, so run.lua can compare them.
 *
 *   raw setup SEND RECV                      tables, publications, slots, subscriptions
 *   raw latency N WARM SEND                  send, wait for the ack, one at a time:
 *                                            "n s1 .. sn" (seconds each)
 *   raw listen N RECV                        consume N as they come: "n s1 .. sn" (send ->
 *                                            row in hand); prints "ready PID" first
 *   raw inserts N SEND [exact|paused]        N single-row transactions: elapsed rate
 *                                            (exact: into ex_out; paused: the receiving
 *                                            subscription is disabled, so it does not
 *                                            wait for the last ack, which cannot come)
 *   raw batch N SEND RECV plain|raw          N rows in one transaction: send_s deliver_s
 *   raw consume N RECV                       DELETE .. RETURNING, one row per
 *                                            transaction: elapsed rate
 */
#include <errno.h>
#include <math.h> /* NAN */
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#define WAIT_LIMIT 300.0 /* seconds any single wait may take before we give up */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
	va_list ap;
	fputs("raw: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die("clock_gettime: %s", strerror(errno));
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
	struct timespec ts;
	ts.tv_sec = (time_t)s;
	ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static PGconn *db_connect(const char *conninfo)
{
	PGconn *c = PQconnectdb(conninfo);
	if (c == NULL)
		die("out of memory connecting");
	if (PQstatus(c) != CONNECTION_OK)
		die("connect (%s): %s", conninfo, PQerrorMessage(c));
	return c;
}

/* Checks a result; returns it (the caller clears it). */
static PGresult *check(PGconn *c, PGresult *r, const char *what)
{
	ExecStatusType st;
	if (r == NULL)
		die("%s: %s", what, PQerrorMessage(c));
	st = PQresultStatus(r);
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
		char msg[1024];
		snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
		PQclear(r);
		die("%s: %s", what, msg);
	}
	return r;
}

static void exec(PGconn *c, const char *sql)
{
	PQclear(check(c, PQexec(c, sql), sql));
}

static void prepare(PGconn *c, const char *name, const char *sql, int nparams)
{
	PQclear(check(c, PQprepare(c, name, sql, nparams, NULL), sql));
}

static PGresult *run(PGconn *c, const char *name, int n, const char *const *values)
{
	return check(c, PQexecPrepared(c, name, n, values, NULL, NULL, 0), name);
}

/* Waits until a notification arrives (returns 1) or `timeout` seconds pass (0). */
static int wait_notify(PGconn *c, double timeout)
{
	double deadline = now() + timeout;
	for (;;) {
		PGnotify *n;
		int got = 0, rc;
		struct pollfd pfd;
		double left;
		if (!PQconsumeInput(c))
			die("waiting: %s", PQerrorMessage(c));
		while ((n = PQnotifies(c)) != NULL) {
			got = 1;
			PQfreemem(n);
		}
		if (got)
			return 1;
		left = deadline - now();
		if (left <= 0)
			return 0;
		pfd.fd = PQsocket(c);
		if (pfd.fd < 0)
			die("waiting: connection has no socket");
		pfd.events = POLLIN;
		pfd.revents = 0;
		rc = poll(&pfd, 1, (int)(left * 1000.0) + 1);
		if (rc < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));
	}
}

static long arg_count(const char *s)
{
	char *end;
	long n = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || n < 0 || n > 100000000)
		die("bad count %s", s);
	return n;
}

/* One line: the number of samples, then each (seconds); run.lua takes percentiles. */
static void print_samples(const double *v, long n)
{
	long i;
	printf("%ld", n);
	for (i = 0; i < n; i++)
		printf(" %.9f", v[i]);
	putchar('\n');
}

static double *alloc_doubles(long n)
{
	double *v = malloc((size_t)(n > 0 ? n : 1) * sizeof *v);
	if (v == NULL)
		die("out of memory");
	return v;
}

/* --- setup ------------------------------------------------------------------ */

static const char *const SEND_SQL[] = {
	"create table public.raw_out (id uuid primary key default gen_random_uuid(),"
	" type text not null, data jsonb not null, sent_at timestamptz not null default now())",
	"create table public.plain_out (id uuid primary key default gen_random_uuid(),"
	" type text not null, data jsonb not null, sent_at timestamptz not null default now())",
	"create table public.raw_ack (id uuid primary key, acked_at timestamptz not null default now())",
	"create function public.raw_ack_arrived() returns trigger language plpgsql"
	" set search_path = pg_catalog as $$ begin perform pg_notify('raw_ack', ''); return null; end $$",
	"create trigger arrived after insert on public.raw_ack for each row execute function public.raw_ack_arrived()",
	"alter table public.raw_ack enable always trigger arrived",
	"create table public.ex_out (id uuid primary key default gen_random_uuid(),"
	" type text not null, data jsonb not null, sent_at timestamptz not null default now())",
	"create table public.ex_ack (id uuid primary key)",
	/* the ack removes the message; the ack row itself is not kept */
	"create function public.ex_ack_arrived() returns trigger language plpgsql"
	" set search_path = pg_catalog as $$ begin"
	" delete from public.ex_out where id = new.id;"
	" perform pg_notify('ex_ack', ''); return null; end $$",
	"create trigger arrived before insert on public.ex_ack for each row execute function public.ex_ack_arrived()",
	"alter table public.ex_ack enable always trigger arrived",
	"create publication raw_pub for table public.raw_out, public.plain_out, public.ex_out with (publish = 'insert')",
	"select pg_create_logical_replication_slot('raw_to_recv', 'pgoutput')",
	NULL,
};

static const char *const RECV_SQL[] = {
	"create table public.raw_out (id uuid primary key, type text not null, data jsonb not null,"
	" sent_at timestamptz not null, pos bigserial not null)",
	"create index raw_out_pos on public.raw_out (pos)",
	"create table public.plain_out (id uuid primary key, type text not null, data jsonb not null,"
	" sent_at timestamptz not null)",
	"create table public.raw_ack (id uuid primary key, acked_at timestamptz not null default now())",
	/* one row trigger; identical notifications fold into one per transaction */
	"create function public.raw_arrived() returns trigger language plpgsql"
	" set search_path = pg_catalog as $$ begin"
	" insert into public.raw_ack (id) values (new.id);"
	" perform pg_notify('raw_msg', ''); return null; end $$",
	"create trigger arrived after insert on public.raw_out for each row execute function public.raw_arrived()",
	"alter table public.raw_out enable always trigger arrived",
	"create table public.ex_out (id uuid primary key, type text not null, data jsonb not null,"
	" sent_at timestamptz not null, pos bigserial not null)",
	"create index ex_out_pos on public.ex_out (pos)",
	"create table public.ex_seen (id uuid primary key)",
	"create table public.ex_ack (id uuid primary key)",
	/* acked every time it arrives (the sender may have lost an ack), taken once: a
	 * message seen before is dropped; the ack's insert travels through the slot, its
	 * delete does not */
	"create function public.ex_arrived() returns trigger language plpgsql"
	" set search_path = pg_catalog as $$ begin"
	" insert into public.ex_ack (id) values (new.id);"
	" delete from public.ex_ack where id = new.id;"
	" insert into public.ex_seen (id) values (new.id) on conflict do nothing;"
	" if not found then return null; end if;"
	" perform pg_notify('ex_msg', ''); return new; end $$",
	"create trigger arrived before insert on public.ex_out for each row execute function public.ex_arrived()",
	"alter table public.ex_out enable always trigger arrived",
	"create publication ack_pub for table public.raw_ack, public.ex_ack with (publish = 'insert')",
	"select pg_create_logical_replication_slot('raw_to_send', 'pgoutput')",
	NULL,
};

/* sync: the subscription's synchronous_commit. The messages' subscription commits
 * synchronously, as msgbus's do, so that the ack it writes is flushed and sent back at
 * once; the acks' subscription writes nothing that travels on, so its commits need
 * not wait for their fsync (msgbus does the same for transactions of acks only). */
static void subscribe(PGconn *c, const char *name, const char *peer, const char *pub, const char *sync)
{
	char sql[2048];
	char *lit = PQescapeLiteral(c, peer, strlen(peer));
	if (lit == NULL)
		die("escape: %s", PQerrorMessage(c));
	snprintf(sql, sizeof sql,
	         "create subscription %s connection %s publication %s with (create_slot = false,"
	         " slot_name = '%s', copy_data = false, synchronous_commit = '%s', binary = true)",
	         name, lit, pub, name, sync);
	PQfreemem(lit);
	exec(c, sql);
}

/* Sends one row through raw_out and waits for its ack: both directions stream. */
static void probe(PGconn *send)
{
	const char *vals[1] = {"{\"probe\": true}"};
	PGresult *r;
	char id[64];
	double deadline = now() + 60;
	exec(send, "listen raw_ack");
	prepare(send, "probe_ins", "insert into public.raw_out (type, data) values ('probe', $1::jsonb) returning id", 1);
	prepare(send, "probe_ack", "select 1 from public.raw_ack where id = $1::uuid", 1);
	r = run(send, "probe_ins", 1, vals);
	snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	vals[0] = id;
	for (;;) {
		int found;
		r = run(send, "probe_ack", 1, vals);
		found = PQntuples(r) > 0;
		PQclear(r);
		if (found)
			return;
		if (now() > deadline)
			die("setup: no ack for the probe row after 60 s");
		wait_notify(send, 1.0);
	}
}

static int cmd_setup(const char *send_ci, const char *recv_ci)
{
	PGconn *send = db_connect(send_ci), *recv = db_connect(recv_ci);
	int i;
	for (i = 0; SEND_SQL[i]; i++)
		exec(send, SEND_SQL[i]);
	for (i = 0; RECV_SQL[i]; i++)
		exec(recv, RECV_SQL[i]);
	subscribe(recv, "raw_to_recv", send_ci, "raw_pub", "on");
	subscribe(send, "raw_to_send", recv_ci, "ack_pub", "off");
	probe(send);
	printf("ok\n");
	PQfinish(send);
	PQfinish(recv);
	return 0;
}

/* --- sending ---------------------------------------------------------------- */

static const char INS_SQL[] = "insert into public.raw_out (type, data) values ('bench', $1::jsonb) returning id";
static const char ACKED_SQL[] = "select 1 from public.raw_ack where id = $1::uuid";
static const char PLAIN_INS_SQL[] = "insert into public.plain_out (type, data) values ('bench', $1::jsonb) returning id";
static const char EX_INS_SQL[] = "insert into public.ex_out (type, data) values ('bench', $1::jsonb) returning id";
/* exact: an ack is not kept; it removed the message */
static const char EX_ACKED_SQL[] = "select 1 where not exists (select from public.ex_out where id = $1::uuid)";

/* Prepares "ins" (the insert `ins_sql`) and "acked" (raw_out's acks, or with exact
 * ex_out's) and listens for those acks. */
static void prepare_send(PGconn *c, const char *ins_sql, int exact)
{
	exec(c, exact ? "listen ex_ack" : "listen raw_ack");
	prepare(c, "ins", ins_sql, 1);
	prepare(c, "acked", exact ? EX_ACKED_SQL : ACKED_SQL, 1);
}

/* Waits until `id` is acked (prepare_send must have run). With fresh set, `id` was
 * inserted by this connection's last statement, which committed: its ack cannot have
 * come before that, and its notification cannot be missed, so it waits for a
 * notification before it asks (msgbus's wait_ack does the same). */
static void wait_ack(PGconn *c, const char *id, int fresh)
{
	const char *vals[1] = {id};
	double deadline = now() + WAIT_LIMIT;
	for (;;) {
		if (!fresh) {
			PGresult *r = run(c, "acked", 1, vals);
			int found = PQntuples(r) > 0;
			PQclear(r);
			if (found)
				return;
			if (now() > deadline)
				die("no ack for %s after %.0f s", id, WAIT_LIMIT);
		}
		fresh = 0;
		wait_notify(c, deadline - now());
	}
}

static void send_one(PGconn *c, const char *data, char *id, size_t idsize)
{
	const char *vals[1] = {data};
	PGresult *r = run(c, "ins", 1, vals);
	if (PQntuples(r) != 1)
		die("insert returned %d rows", PQntuples(r));
	snprintf(id, idsize, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

static int cmd_latency(long n, long warm, const char *send_ci)
{
	PGconn *c = db_connect(send_ci);
	double *lat = alloc_doubles(n);
	long i;
	prepare_send(c, INS_SQL, 0);
	for (i = -warm; i < n; i++) {
		char data[64], id[64];
		double t0 = now();
		/* t = 0 marks a warm-up message: the listener does not count its latency */
		snprintf(data, sizeof data, "{\"t\": %.9f}", i < 0 ? 0.0 : t0);
		send_one(c, data, id, sizeof id);
		wait_ack(c, id, 1);
		if (i >= 0)
			lat[i] = now() - t0;
	}
	print_samples(lat, n);
	free(lat);
	PQfinish(c);
	return 0;
}

static int cmd_inserts(long n, const char *send_ci, int exact, int paused)
{
	PGconn *c = db_connect(send_ci);
	char id[64] = "";
	double t0, elapsed;
	long i;
	prepare_send(c, exact ? EX_INS_SQL : INS_SQL, exact);
	t0 = now();
	for (i = 0; i < n; i++) {
		char data[64];
		snprintf(data, sizeof data, "{\"n\": %ld}", i);
		send_one(c, data, id, sizeof id);
	}
	elapsed = now() - t0;
	/* not timed: let replication catch up so the next figure starts quiet (when
	 * paused, run.lua waits once it has enabled the subscription again) */
	if (n > 0 && !paused)
		wait_ack(c, id, 0);
	printf("%.9f %.3f\n", elapsed, elapsed > 0 ? (double)n / elapsed : NAN);
	PQfinish(c);
	return 0;
}

static int cmd_batch(long n, const char *send_ci, const char *recv_ci, const char *which)
{
	PGconn *send = db_connect(send_ci), *recv = db_connect(recv_ci);
	int plain;
	char id[64] = "";
	double t0, tc, td;
	long i;
	PGresult *r;
	if (strcmp(which, "plain") == 0)
		plain = 1;
	else if (strcmp(which, "raw") == 0)
		plain = 0;
	else
		die("batch: table must be plain or raw, not %s", which);
	if (n < 1)
		die("batch: need at least one row");
	prepare_send(send, plain ? PLAIN_INS_SQL : INS_SQL, 0);
	prepare(recv, "there", "select 1 from public.plain_out where id = $1::uuid", 1);
	t0 = now();
	exec(send, "begin");
	for (i = 0; i < n; i++) {
		char data[64];
		snprintf(data, sizeof data, "{\"n\": %ld}", i);
		send_one(send, data, id, sizeof id);
	}
	exec(send, "commit");
	tc = now();
	if (plain) {
		/* one remote transaction: the rows all become visible at once */
		const char *vals[1] = {id};
		double deadline = tc + WAIT_LIMIT;
		for (;;) {
			int found;
			r = run(recv, "there", 1, vals);
			found = PQntuples(r) > 0;
			PQclear(r);
			if (found)
				break;
			if (now() > deadline)
				die("batch: rows not on the subscriber after %.0f s", WAIT_LIMIT);
			sleep_s(0.001);
		}
	} else {
		wait_ack(send, id, 0);
	}
	td = now();
	r = check(recv, PQexec(recv, plain ? "select count(*) from public.plain_out" : "select count(*) from public.raw_out"),
	          "count");
	printf("%.9f %.9f %s\n", tc - t0, td - tc, PQgetvalue(r, 0, 0));
	PQclear(r);
	PQfinish(send);
	PQfinish(recv);
	return 0;
}

/* --- receiving -------------------------------------------------------------- */

static const char TAKE_SQL[] =
	"delete from public.raw_out where pos = (select pos from public.raw_out order by pos limit 1"
	" for update skip locked) returning (data->>'t')::float8";

static int cmd_listen(long n, const char *recv_ci)
{
	PGconn *c = db_connect(recv_ci);
	double *lat = alloc_doubles(n);
	long handled = 0, m = 0;
	exec(c, "listen raw_msg");
	prepare(c, "take", TAKE_SQL, 0);
	printf("ready %ld\n", (long)getpid());
	fflush(stdout);
	while (handled < n) {
		PGresult *r = run(c, "take", 0, NULL);
		if (PQntuples(r) == 1) {
			double t = now();
			if (!PQgetisnull(r, 0, 0)) {
				double sent = strtod(PQgetvalue(r, 0, 0), NULL);
				if (sent > 0)
					lat[m++] = t - sent;
			}
			handled++;
			PQclear(r);
			continue;
		}
		PQclear(r);
		if (!wait_notify(c, WAIT_LIMIT))
			die("listen: nothing arrived for %.0f s (%ld of %ld handled)", WAIT_LIMIT, handled, n);
	}
	print_samples(lat, m);
	free(lat);
	PQfinish(c);
	return 0;
}

static int cmd_consume(long n, const char *recv_ci)
{
	PGconn *c = db_connect(recv_ci);
	double t0, elapsed;
	long i;
	prepare(c, "take", TAKE_SQL, 0);
	t0 = now();
	for (i = 0; i < n; i++) {
		PGresult *r = run(c, "take", 0, NULL);
		int got = PQntuples(r);
		PQclear(r);
		if (got != 1)
			die("consume: the inbox ran dry after %ld of %ld rows", i, n);
	}
	elapsed = now() - t0;
	printf("%.9f %.3f\n", elapsed, elapsed > 0 ? (double)n / elapsed : NAN);
	PQfinish(c);
	return 0;
}

static void usage(void)
{
	die("usage: raw setup SEND RECV | latency N WARM SEND | listen N RECV | inserts N SEND [exact|paused]"
	    " | batch N SEND RECV plain|raw | consume N RECV");
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "setup") == 0 && argc == 4)
		return cmd_setup(argv[2], argv[3]);
	if (strcmp(argv[1], "latency") == 0 && argc == 5)
		return cmd_latency(arg_count(argv[2]), arg_count(argv[3]), argv[4]);
	if (strcmp(argv[1], "listen") == 0 && argc == 4)
		return cmd_listen(arg_count(argv[2]), argv[3]);
	if (strcmp(argv[1], "inserts") == 0 && argc == 4)
		return cmd_inserts(arg_count(argv[2]), argv[3], 0, 0);
	if (strcmp(argv[1], "inserts") == 0 && argc == 5 && strcmp(argv[4], "exact") == 0)
		return cmd_inserts(arg_count(argv[2]), argv[3], 1, 0);
	if (strcmp(argv[1], "inserts") == 0 && argc == 5 && strcmp(argv[4], "paused") == 0)
		return cmd_inserts(arg_count(argv[2]), argv[3], 0, 1);
	if (strcmp(argv[1], "batch") == 0 && argc == 6)
		return cmd_batch(arg_count(argv[2]), argv[3], argv[4], argv[5]);
	if (strcmp(argv[1], "consume") == 0 && argc == 4)
		return cmd_consume(arg_count(argv[2]), argv[3]);
	usage();
	return 1;
}
