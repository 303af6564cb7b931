"""The tables, the wake-up trigger and every statement the broker and result backend run.

One `messages` table holds every queue's messages, ready, delayed, held or dead-lettered (a
message's state is its columns: `consumer` is the holder, `available_at` in the future is a delay,
`queue` ending in `.dead` is a dead letter). A queue is a name, not a table of its own: a worker
that serves several queues reserves from all of them in one statement, `publish_many` inserts a
whole batch across queues in one statement, declaring a queue takes no DDL lock, and a Celery queue
name (dots, any length) needs no mapping to a 63-byte identifier. The partial index on ready
messages keeps each queue an ordered range scan, whatever else the table holds.

Wake-ups are `NOTIFY` on a channel per queue (`mp_` + md5 of the name: any name fits the
identifier limit). A statement-level trigger sends them for every INSERT, so every writer wakes
consumers, including a plain SQL `INSERT` from another program, and a batch sends one notification
per queue, not per row. The statements that make held rows ready again (requeue, give back,
restore, replay) notify in the same statement instead of through an UPDATE trigger: such a
trigger would also run on every fetch, which is an UPDATE too, and cost each one a transition
table of the rows it reserved.

Leases live in `consumers`: each consumer's helper thread pushes its `expires_at` forward; a
message whose holder's lease has expired (or whose holder has no row) is given back by whoever
beats next.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import sql

#: bump when the DDL below changes; `ensure` re-runs it (idempotently) for older schemas
VERSION = 2  # 2: chords

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    available_at timestamptz NOT NULL DEFAULT now(),
    consumer text,
    deliveries integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    body bytea NOT NULL,
    headers jsonb NOT NULL,
    properties jsonb NOT NULL,
    content_type text NOT NULL,
    content_encoding text NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON {s}.messages (queue, available_at, id)
    WHERE consumer IS NULL;
CREATE INDEX IF NOT EXISTS messages_held ON {s}.messages (consumer)
    WHERE consumer IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.consumers (
    id text PRIMARY KEY,
    queues text[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.queues (
    name text PRIMARY KEY,
    declared_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.results (
    task_id text PRIMARY KEY,
    meta jsonb NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX IF NOT EXISTS results_expiry ON {s}.results (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.groups (
    group_id text PRIMARY KEY,
    value jsonb NOT NULL,
    expires_at timestamptz
);
CREATE TABLE IF NOT EXISTS {s}.chords (
    group_id text PRIMARY KEY,
    size integer NOT NULL,
    claimed_until timestamptz,
    claim_token text,
    done boolean NOT NULL DEFAULT false,
    expires_at timestamptz
);
CREATE TABLE IF NOT EXISTS {s}.chord_parts (
    group_id text NOT NULL,
    task_id text NOT NULL,
    idx double precision NOT NULL,
    state text NOT NULL,
    result jsonb NOT NULL,
    PRIMARY KEY (group_id, task_id, idx)
);
CREATE OR REPLACE FUNCTION {s}.notify_ready() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mp_' || md5(q.queue), '')
       FROM (SELECT DISTINCT queue FROM new_rows WHERE consumer IS NULL) AS q;
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER messages_inserted AFTER INSERT ON {s}.messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_ready();
DELETE FROM {s}.schema_version;
INSERT INTO {s}.schema_version (version) VALUES ({version});
"""

_COLUMNS = "body, headers, properties, content_type, content_encoding"


def _ringing(update: str) -> str:
    """`update` (an UPDATE ... RETURNING queue) as a statement that also NOTIFYs each queue it
    made rows ready in, once, and returns how many rows it changed."""
    return (
        f"WITH moved AS ({update} RETURNING queue),"  # noqa: S608 - constants of this module
        " bells AS (SELECT pg_notify('mp_' || md5(d.queue), '')"
        " FROM (SELECT DISTINCT queue FROM moved) AS d)"
        " SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM bells)"
    )


def channel(queue: str) -> str:
    """The NOTIFY channel of a queue (the trigger computes the same in SQL)."""
    return "mp_" + hashlib.md5(queue.encode(), usedforsecurity=False).hexdigest()


def result_channel(task_id: str) -> str:
    """The NOTIFY channel a result's waiters listen on."""
    return "mp_r_" + hashlib.md5(task_id.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement, composed once for a schema."""

    ddl: sql.Composed
    version: sql.Composed
    publish: sql.Composed
    publish_many: sql.Composed
    declare: sql.Composed
    fetch: sql.Composed
    ack: sql.Composed
    requeue: sql.Composed
    dead_letter: sql.Composed
    give_back_all: sql.Composed
    give_back_unknown: sql.Composed
    beat: sql.Composed
    restore: sql.Composed
    leave: sql.Composed
    purge: sql.Composed
    queue_length: sql.Composed
    delayed_count: sql.Composed
    dead_letters: sql.Composed
    replay: sql.Composed
    store_result: sql.Composed
    peek_result: sql.Composed
    forget_result: sql.Composed
    expire_results: sql.Composed
    save_group: sql.Composed
    restore_group: sql.Composed
    forget_group: sql.Composed
    chord_start: sql.Composed
    chord_clear: sql.Composed
    chord_lock: sql.Composed
    chord_add: sql.Composed
    chord_count: sql.Composed
    chord_claim: sql.Composed
    chord_parts: sql.Composed
    chord_done: sql.Composed
    chord_claimed: sql.Composed
    chord_release: sql.Composed


def statements(schema: str) -> Statements:
    s = sql.Identifier(schema)
    cols = sql.SQL(_COLUMNS)

    def q(text: str) -> sql.Composed:
        return sql.SQL(text).format(s=s, version=sql.Literal(VERSION), cols=cols)

    # The fetch reserves a whole batch in one statement: the oldest ready messages of the
    # consumer's queues, skipping rows another consumer is reserving at this instant. Each queue
    # is its own ordered scan of the ready index (a LATERAL subquery per queue): `queue =
    # ANY(...)` in one scan would make the planner read and sort every ready row of the queues.
    return Statements(
        ddl=q(_DDL),
        version=q("SELECT max(version) FROM {s}.schema_version"),
        publish=q(
            "INSERT INTO {s}.messages (queue, available_at, {cols}) VALUES "
            "(%s, COALESCE(to_timestamp(%s::float8), now()), %s, %s::jsonb, %s::jsonb, %s, %s)"
        ),
        publish_many=q(
            "INSERT INTO {s}.messages (queue, available_at, {cols}) "
            "SELECT queue, COALESCE(to_timestamp(eta), now()), body, headers::jsonb, "
            "properties::jsonb, content_type, content_encoding "
            "FROM unnest(%s::text[], %s::float8[], %s::bytea[], %s::text[], %s::text[], "
            "%s::text[], %s::text[]) "
            "AS b(queue, eta, body, headers, properties, content_type, content_encoding)"
        ),
        declare=q("INSERT INTO {s}.queues (name) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING"),
        fetch=q(
            "WITH picked AS ("
            " SELECT m.id FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL ("
            " SELECT id, available_at FROM {s}.messages"
            " WHERE queue = q.name AND consumer IS NULL AND available_at <= now()"
            " ORDER BY available_at, id LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS m"
            " ORDER BY m.available_at, m.id LIMIT %(n)s),"
            " taken AS ("
            " UPDATE {s}.messages m SET consumer = %(me)s, deliveries = m.deliveries + 1"
            " FROM picked WHERE m.id = picked.id"
            " RETURNING m.id, m.queue, m.deliveries, m.available_at, {cols})"
            " (SELECT id, queue, deliveries, {cols}, NULL::float8 AS due FROM taken"
            " ORDER BY available_at, id)"
            # nothing reserved: the same round trip says when the earliest delayed one is due
            " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
            " (SELECT extract(epoch FROM min(d.available_at) - now())::float8"
            " FROM unnest(%(queues)s::text[]) AS q(name) CROSS JOIN LATERAL ("
            " SELECT available_at FROM {s}.messages WHERE queue = q.name AND consumer IS NULL"
            " ORDER BY available_at LIMIT 1) AS d)"
            " WHERE NOT EXISTS (SELECT 1 FROM taken)"
        ),
        ack=q("DELETE FROM {s}.messages WHERE id = ANY(%s::bigint[]) AND consumer = %s"),
        requeue=q(
            _ringing(
                "UPDATE {s}.messages SET consumer = NULL WHERE id = %s::bigint AND consumer = %s"
            )
        ),
        dead_letter=q(
            _ringing(
                "UPDATE {s}.messages SET queue = %s, consumer = NULL,"
                " headers = headers || jsonb_build_object('x-millpond-death-reason', %s::text)"
                " WHERE id = %s::bigint AND consumer = %s"
            )
        ),
        give_back_all=q(_ringing("UPDATE {s}.messages SET consumer = NULL WHERE consumer = %s")),
        # messages reserved by a fetch whose reply was lost: given back uncounted
        give_back_unknown=q(
            _ringing(
                "UPDATE {s}.messages SET consumer = NULL, deliveries = greatest(deliveries - 1, 0)"
                " WHERE consumer = %s AND id <> ALL(%s::bigint[])"
            )
        ),
        # a lease refresh; `inserted` is true when the row was gone (first beat, or lapsed)
        beat=q(
            "INSERT INTO {s}.consumers (id, queues, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            " RETURNING (xmax = 0) AS inserted"
        ),
        restore=q(
            "WITH gone AS (DELETE FROM {s}.consumers WHERE expires_at < now() RETURNING id),"
            " moved AS (UPDATE {s}.messages m SET consumer = NULL"
            " WHERE m.consumer IS NOT NULL AND (m.consumer IN (SELECT id FROM gone)"
            " OR NOT EXISTS (SELECT 1 FROM {s}.consumers c WHERE c.id = m.consumer))"
            " RETURNING m.queue),"
            " bells AS (SELECT pg_notify('mp_' || md5(d.queue), '')"
            " FROM (SELECT DISTINCT queue FROM moved) AS d)"
            " SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM bells)"
        ),
        leave=q("DELETE FROM {s}.consumers WHERE id = %s"),
        purge=q("DELETE FROM {s}.messages WHERE queue = %s AND consumer IS NULL"),
        queue_length=q(
            "SELECT count(*) FROM {s}.messages"
            " WHERE queue = %s AND consumer IS NULL AND available_at <= now()"
        ),
        delayed_count=q(
            "SELECT count(*) FROM {s}.messages"
            " WHERE queue = %s AND consumer IS NULL AND available_at > now()"
        ),
        dead_letters=q(
            "SELECT id, {cols} FROM {s}.messages WHERE queue = %s AND consumer IS NULL"
            " ORDER BY id LIMIT %s"
        ),
        replay=q(
            _ringing(
                "UPDATE {s}.messages SET queue = %s, deliveries = 0, available_at = now(),"
                " headers = headers - 'x-millpond-death-reason'"
                " WHERE id IN (SELECT id FROM {s}.messages WHERE queue = %s AND consumer IS NULL"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
            )
        ),
        store_result=q(
            "WITH up AS (INSERT INTO {s}.results (task_id, meta, expires_at)"
            " VALUES (%(id)s, %(meta)s::jsonb, CASE WHEN %(ttl)s > 0"
            " THEN now() + make_interval(secs => %(ttl)s) END)"
            " ON CONFLICT (task_id) DO UPDATE SET meta = EXCLUDED.meta,"
            " stored_at = now(), expires_at = EXCLUDED.expires_at RETURNING task_id)"
            " SELECT pg_notify(%(channel)s, '') FROM up"
        ),
        peek_result=q(
            "SELECT meta FROM {s}.results"
            " WHERE task_id = %s AND (expires_at IS NULL OR expires_at > now())"
        ),
        forget_result=q("DELETE FROM {s}.results WHERE task_id = %s"),
        expire_results=q(
            "DELETE FROM {s}.results WHERE task_id IN (SELECT task_id FROM {s}.results"
            " WHERE expires_at < now() LIMIT 1000)"
        ),
        save_group=q(
            "INSERT INTO {s}.groups (group_id, value, expires_at) VALUES (%(id)s, %(value)s::jsonb,"
            " CASE WHEN %(ttl)s > 0 THEN now() + make_interval(secs => %(ttl)s) END)"
            " ON CONFLICT (group_id) DO UPDATE SET value = EXCLUDED.value,"
            " expires_at = EXCLUDED.expires_at"
        ),
        restore_group=q(
            "SELECT value FROM {s}.groups"
            " WHERE group_id = %s AND (expires_at IS NULL OR expires_at > now())"
        ),
        forget_group=q("DELETE FROM {s}.groups WHERE group_id = %s"),
        # a chord's join: each step one transaction, the chord's row locked for it, so exactly
        # one caller completes (claims) it
        chord_start=q(
            "INSERT INTO {s}.chords (group_id, size, expires_at) VALUES (%(id)s, %(size)s,"
            " CASE WHEN %(ttl)s > 0 THEN now() + make_interval(secs => %(ttl)s) END)"
            " ON CONFLICT (group_id) DO UPDATE SET size = EXCLUDED.size, claimed_until = NULL,"
            " done = false, expires_at = EXCLUDED.expires_at"
        ),
        chord_clear=q("DELETE FROM {s}.chord_parts WHERE group_id = %s"),
        chord_lock=q(
            "SELECT size, claimed_until > now(), done, claim_token FROM {s}.chords"
            " WHERE group_id = %s FOR UPDATE"
        ),
        chord_add=q(
            "INSERT INTO {s}.chord_parts (group_id, task_id, idx, state, result)"
            " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING"
        ),
        chord_count=q("SELECT count(*) FROM {s}.chord_parts WHERE group_id = %s"),
        chord_claim=q(
            "UPDATE {s}.chords SET claimed_until = now() + make_interval(secs => %s),"
            " claim_token = %s WHERE group_id = %s"
        ),
        chord_parts=q(
            "SELECT task_id, state, result FROM {s}.chord_parts WHERE group_id = %s"
            " ORDER BY idx, task_id"
        ),
        chord_done=q("UPDATE {s}.chords SET done = true WHERE group_id = %s"),
        chord_claimed=q(
            "SELECT extract(epoch FROM claimed_until) FROM {s}.chords"
            " WHERE group_id = %s AND NOT done AND claimed_until > now()"
        ),
        chord_release=q("UPDATE {s}.chords SET claimed_until = NULL WHERE group_id = %s"),
    )
