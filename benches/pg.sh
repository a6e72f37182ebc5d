#!/usr/bin/env bash
# PostgreSQL through portcullis versus directly, in one run, on loopback:
#   - pgbench -S (select-only), 16 clients
#   - pgbench default (TPC-B-like), 16 clients
#   - session set-up latency p50/p99 (pgbench -C: a new connection per transaction,
#     i.e. TLS + token check + upstream SCRAM through portcullis)
#   - a peer, side by side: PgBouncer (session pooling) terminating client TLS the same
#     way, so "what does any relay in the middle cost on this machine" has an answer
#     (skipped if pgbouncer is not installed; `apt-get install pgbouncer`)
# The first baseline is plaintext loopback (no TLS at all); the second is the server
# itself doing TLS, which is what the client pays for in both cases through portcullis.
# Bounded: about 2 minutes. Needs a release build (cargo build --release) and the
# postgresql package. Usage: bash benches/pg.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-15}
BIN=${PORTCULLIS_BIN:-target/release/portcullis}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -x "$PGBIN/pgbench" ] || { echo "install postgresql (tests/setup.sh)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run_as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

WORK=$(mktemp -d /tmp/portcullis-pgbench.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK"
PGPORT_DIRECT=$(free_port); PROXY_PORT=$(free_port); BOUNCER_PORT=$(free_port); HTTPS_PORT=$(free_port); ADMIN_PORT=$(free_port)
PW=bench-$(date +%s)-pw
DEMO_PID=""
BOUNCER_PID=""
cleanup() {
  [ -n "$DEMO_PID" ] && kill "$DEMO_PID" 2>/dev/null || true
  [ -n "$BOUNCER_PID" ] && kill "$BOUNCER_PID" 2>/dev/null || true
  run_as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

run_as_pg "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 --no-sync >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
port = $PGPORT_DIRECT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
password_encryption = 'scram-sha-256'
max_connections = 100
shared_buffers = '128MB'
fsync = off
synchronous_commit = off
CONF
printf 'local all postgres trust\nhost all all 127.0.0.1/32 scram-sha-256\n' > "$WORK/data/pg_hba.conf"
# TLS on the server too, for a second baseline: direct with sslmode=require.
cp certs/dev/server.pem "$WORK/data/server.crt"; cp certs/dev/server-key.pem "$WORK/data/server.key"
chmod 600 "$WORK/data/server.key"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/data/server.crt" "$WORK/data/server.key"
printf "ssl = on\n" >> "$WORK/data/postgresql.conf"
run_as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
"$PGBIN/psql" -X -q -h "$WORK" -p "$PGPORT_DIRECT" -U postgres -c "create role app login password '$PW'"
"$PGBIN/psql" -X -q -h "$WORK" -p "$PGPORT_DIRECT" -U postgres -c "create database bench owner app"
PGPASSWORD=$PW "$PGBIN/pgbench" -q -i -s 10 -h 127.0.0.1 -p "$PGPORT_DIRECT" -U app bench >/dev/null 2>&1

# portcullis: the demo set-up (dev issuer, demo policy), audit events to a file.
"$BIN" demo --listen "127.0.0.1:$HTTPS_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --postgres-listen "127.0.0.1:$PROXY_PORT" --state-dir "$WORK/demo" \
  --postgres "postgres://app:$PW@127.0.0.1:$PGPORT_DIRECT/bench" >"$WORK/audit.jsonl" 2>"$WORK/demo.log" &
DEMO_PID=$!
for _ in $(seq 100); do grep -q "sslmode=require" "$WORK/audit.jsonl" 2>/dev/null && break; sleep 0.2; done
TOKEN=$("$BIN" dev token --state-dir "$WORK/demo" --ttl 3600)

# PgBouncer: client TLS required (same certificate), plaintext to the server, session
# pooling, SCRAM to the client and to the server.
BOUNCER=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
if [ -n "$BOUNCER" ]; then
  cp certs/dev/server.pem "$WORK/bouncer.crt"; cp certs/dev/server-key.pem "$WORK/bouncer.key"
  printf '"app" "%s"\n' "$PW" > "$WORK/userlist.txt"
  cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PGPORT_DIRECT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
client_tls_sslmode = require
client_tls_cert_file = $WORK/bouncer.crt
client_tls_key_file = $WORK/bouncer.key
logfile = $WORK/pgbouncer.log
INI
  chmod 600 "$WORK/bouncer.key" "$WORK/userlist.txt"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK"/bouncer.* "$WORK/userlist.txt" "$WORK/pgbouncer.ini"
  run_as_pg "$BOUNCER" "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
  BOUNCER_PID=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$BOUNCER_PORT") 2>/dev/null && break; sleep 0.1; done
fi

tps() { grep -Eo 'tps = [0-9.]+' | head -1 | awk '{print $3}'; }
direct_tls() { PGPASSWORD=$PW PGSSLMODE=require "$PGBIN/pgbench" -h 127.0.0.1 -p "$PGPORT_DIRECT" -U app "$@" bench 2>&1; }
direct() { PGPASSWORD=$PW PGSSLMODE=disable "$PGBIN/pgbench" -h 127.0.0.1 -p "$PGPORT_DIRECT" -U app "$@" bench 2>&1; }
bouncer() { PGPASSWORD=$PW PGSSLMODE=require "$PGBIN/pgbench" -h 127.0.0.1 -p "$BOUNCER_PORT" -U app "$@" bench 2>&1; }
proxied() { PGPASSWORD=$TOKEN PGSSLMODE=require "$PGBIN/pgbench" -h 127.0.0.1 -p "$PROXY_PORT" -U app "$@" bench 2>&1; }

# Set-up latency: one new connection per transaction, per-transaction log in µs.
setup_latency() { # setup_latency direct|proxied -> "p50 p99" in ms
  local dir="$WORK/lat-$1"; mkdir -p "$dir"; chmod 777 "$dir"
  (cd "$dir" && $1 -n -C -S -c 1 -t 300 -l >/dev/null)
  cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n |
    awk '{a[NR]=$1} END {printf "%.2f %.2f\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}'
}

echo "== pgbench -S, 16 clients, ${T}s each"
S_DIRECT=$(direct -n -S -c 16 -j 2 -T "$T" | tps)
S_DIRECT_TLS=$(direct_tls -n -S -c 16 -j 2 -T "$T" | tps)
if [ -n "${PG_PROFILE:-}" ]; then # perf profile of portcullis during the -S run
  (sleep 2; perf record -F 2000 -g -p "$DEMO_PID" -o "$PG_PROFILE" -- sleep $((T - 4)) >/dev/null 2>&1) &
fi
S_PROXY=$(proxied -n -S -c 16 -j 2 -T "$T" | tps)
S_BOUNCER=$([ -n "$BOUNCER_PID" ] && bouncer -n -S -c 16 -j 2 -T "$T" | tps || echo 0)
echo "== pgbench TPC-B-like, 16 clients, ${T}s each"
B_DIRECT=$(direct -n -c 16 -j 2 -T "$T" | tps)
B_PROXY=$(proxied -n -c 16 -j 2 -T "$T" | tps)
B_BOUNCER=$([ -n "$BOUNCER_PID" ] && bouncer -n -c 16 -j 2 -T "$T" | tps || echo 0)
echo "== session set-up (pgbench -C, 300 connections)"
L_DIRECT=$(setup_latency direct)
L_PROXY=$(setup_latency proxied)
STATEMENTS=$(grep -c '"kind":"pg.statement"' "$WORK/audit.jsonl" || true)

printf '\n| workload | direct | through portcullis | ratio |\n|---|---|---|---|\n'
printf '| pgbench -S, 16 clients (tps) | %s | %s | %.2f |\n' "$S_DIRECT" "$S_PROXY" "$(echo "$S_PROXY / $S_DIRECT" | bc -l)"
printf '| pgbench -S, 16 clients, direct also over TLS (tps) | %s | %s | %.2f |\n' "$S_DIRECT_TLS" "$S_PROXY" "$(echo "$S_PROXY / $S_DIRECT_TLS" | bc -l)"
printf '| pgbench TPC-B, 16 clients (tps) | %s | %s | %.2f |\n' "$B_DIRECT" "$B_PROXY" "$(echo "$B_PROXY / $B_DIRECT" | bc -l)"
printf '| session set-up p50 / p99 (ms) | %s / %s | %s / %s | |\n' $L_DIRECT $L_PROXY
if [ -n "$BOUNCER_PID" ]; then
  printf '\nPeer, same run: PgBouncer 1.x, session pooling, client TLS required, plaintext upstream\n\n'
  printf '| workload | PgBouncer (TLS) | ÷ direct | ÷ direct TLS | portcullis ÷ PgBouncer |\n|---|---|---|---|---|\n'
  printf '| pgbench -S, 16 clients (tps) | %s | %.2f | %.2f | %.2f |\n' "$S_BOUNCER" \
    "$(echo "$S_BOUNCER / $S_DIRECT" | bc -l)" "$(echo "$S_BOUNCER / $S_DIRECT_TLS" | bc -l)" "$(echo "$S_PROXY / $S_BOUNCER" | bc -l)"
  printf '| pgbench TPC-B, 16 clients (tps) | %s | %.2f | - | %.2f |\n' "$B_BOUNCER" \
    "$(echo "$B_BOUNCER / $B_DIRECT" | bc -l)" "$(echo "$B_PROXY / $B_BOUNCER" | bc -l)"
fi
echo "(audit: $STATEMENTS pg.statement events written during the run)"
