#!/usr/bin/env bash
# make test-postgres: the integration and short reliability tests against Debian's PostgreSQL, directly and then
# through PgBouncer in transaction mode (the engine's transaction-pooler settings, LISTEN on a direct DSN).
#
# Run as root on a Debian machine (CI does): installs the packages when they are missing (apt-get), then starts
# a cluster and a PgBouncer of its own, as the postgres system user, on free loopback ports under a temporary
# folder, and removes both at the end. The tests connect as a role with exactly the documented privileges:
# LOGIN CREATEDB (no superuser, no pg_signal_backend). See README "Connection poolers".
#
#   tests/servers/realpg.sh                 both passes
#   tests/servers/realpg.sh shell           start the servers, print the variables, wait for Ctrl-C
#   PYTEST_ARGS="-k listen" tests/servers/realpg.sh   narrow both passes
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
MODE=${1:-test}

if [ "$(id -u)" != 0 ]; then
    echo "test-postgres: run as root (it installs packages and runs the servers as the postgres user)" >&2
    exit 2
fi

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pg_bin)" ] || ! command -v pgbouncer >/dev/null 2>&1; then
    echo "test-postgres: installing Debian's postgresql and pgbouncer"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql pgbouncer >/dev/null
fi
BIN=$(pg_bin)
PGBOUNCER=$(command -v pgbouncer)

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d /tmp/ce-realpg.XXXXXX)
chown postgres: "$WORK"
chmod 700 "$WORK"
PORT=$(free_port)
BPORT=$(free_port)
ROLE=ce_test
PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')

as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    if [ -f "$WORK/pgbouncer.pid" ]; then kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true; fi
    as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/sock" && chown postgres: "$WORK/sock"
printf '%s\n' "$PASSWORD" > "$WORK/pwfile" && chown postgres: "$WORK/pwfile"
as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pwfile" --auth-local=peer \
    --auth-host=trust -E UTF8 --no-instructions >/dev/null
# Loopback only and trust authentication: a throw-away cluster whose tests put made-up passwords into DSNs (the
# secret canaries); fsync off: what clients see is the same.
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w start -o \
    "-p $PORT -k $WORK/sock -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off \
     -c synchronous_commit=off -c full_page_writes=off" >/dev/null
# the role: exactly what the README documents for the tests (runtime needs only LOGIN on a database it owns)
as_pg "$BIN/psql" -qX -h "$WORK/sock" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE $ROLE LOGIN CREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '$PASSWORD'"

cat > "$WORK/userlist.txt" <<USERS
"$ROLE" "$PASSWORD"
USERS
cat > "$WORK/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 40
max_db_connections = 0
server_idle_timeout = 30
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
chown postgres: "$WORK"/userlist.txt "$WORK"/pgbouncer.ini
chmod 600 "$WORK"/userlist.txt
as_pg "$PGBOUNCER" -d -q "$WORK/pgbouncer.ini"
for _ in $(seq 50); do [ -f "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done

DIRECT="postgresql://$ROLE@127.0.0.1:$PORT/postgres"
POOLED="postgresql://$ROLE@127.0.0.1:$BPORT/postgres"
echo "test-postgres: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT," \
    "$("$PGBOUNCER" --version | head -1) (transaction mode) on 127.0.0.1:$BPORT, role $ROLE (LOGIN CREATEDB)"

if [ "$MODE" = shell ]; then
    echo "ENGINE_TEST_DATABASE_URL=$DIRECT"
    echo "pooled: ENGINE_TEST_DATABASE_URL=$POOLED ENGINE_TEST_ADMIN_DATABASE_URL=$DIRECT" \
        "ENGINE_TEST_LISTEN_DATABASE_URL=$DIRECT ENGINE_TEST_POOLER=transaction"
    echo "(Ctrl-C stops the servers)"
    trap "exit 130" INT TERM
    sleep infinity &
    wait $!
fi

# Direct: the integration tests and the short reliability suite. The database-restart test restarts an embedded
# server of its own whatever the DSN, and test_embedded tests the embedded server: both run in make test only.
# test_requeue_beside_a_queued_twin_keeps_both races its fetcher against its flusher (it fails now and then on
# the embedded server too): it runs in make test only.
DIRECT_TESTS=(tests/integration tests/reliability)
DESELECT=(--deselect tests/reliability/test_database_restart.py --deselect tests/integration/test_embedded.py
    --deselect tests/integration/test_queue.py::test_requeue_beside_a_queued_twin_keeps_both)
# Through PgBouncer: the pooler tests, the queue (claims, NOTIFY wake-ups, leases, periodic jobs), the lifecycle
# and webhooks, all with ENGINE_DB_POOLER=transaction and LISTEN direct. Left out: tests that find the
# queue's own server connections in pg_stat_activity and kill them (through a pooler those are PgBouncer's),
# and the multi-process tests, whose child processes build their own settings from a DSN alone.
POOLED_TESTS=(tests/integration/test_poolers.py tests/integration/test_queue.py tests/integration/test_lifecycle.py
    tests/integration/test_webhooks.py)
POOLED_DESELECT=(--deselect tests/integration/test_queue.py::test_the_queues_own_connections_come_back_after_they_are_killed
    --deselect tests/integration/test_queue.py::test_stop_closes_the_queues_own_connections)

start=$(date +%s)
echo "test-postgres: pass 1, direct"
ENGINE_TEST_DATABASE_URL="$DIRECT" "$PY" -m pytest -q -p no:cacheprovider "${DESELECT[@]}" \
    ${PYTEST_ARGS:-} "${DIRECT_TESTS[@]}"
mid=$(date +%s)
echo "test-postgres: pass 2, through PgBouncer (transaction mode), LISTEN direct"
ENGINE_TEST_DATABASE_URL="$POOLED" ENGINE_TEST_ADMIN_DATABASE_URL="$DIRECT" ENGINE_TEST_LISTEN_DATABASE_URL="$DIRECT" \
    ENGINE_TEST_POOLER=transaction "$PY" -m pytest -q -p no:cacheprovider "${DESELECT[@]}" "${POOLED_DESELECT[@]}" \
    ${PYTEST_ARGS:-} "${POOLED_TESTS[@]}"
end=$(date +%s)
echo "test-postgres: direct pass $((mid - start)) s, PgBouncer pass $((end - mid)) s"
