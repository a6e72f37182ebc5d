#!/usr/bin/env bash
# Load test of issue #2: portcullis beside nginx and HAProxy, side by side in one run,
# on loopback, with wrk. Prints requests/s, p50/p99 latency and the proxy's CPU time per
# request (utime+stime of its processes from /proc over the run ÷ requests), plus ratios.
#
#   benches/load.sh                 # everything (about 6 minutes)
#   DURATION=5 benches/load.sh      # shorter runs
#   ONLY='nginx-proxy pc-reused' benches/load.sh   # a subset of scenarios (by name)
#   DISTINCT_PRESET=github-actions ONLY="nginx-proxy pc-distinct" benches/load.sh  # same-principal tokens
#   PROFILE=pc-distinct:/tmp/d.perf benches/load.sh  # perf profile of one scenario (32 conns;
#                                   PROFILE_CG="--call-graph=dwarf" for call stacks)
#
# Needs root for `apt-get install wrk nginx haproxy` when they are missing, openssl, and
# target/release/portcullis (built if missing). Everything binds 127.0.0.1 only; every
# process started here is stopped on exit (trap). wrk + the nginx upstream are pinned to
# CPU 0, the proxy under test to CPU 1 (taskset), as in benches/peers/UPSTREAM-README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS="$ROOT/benches/peers"
BIN="${PORTCULLIS_BIN:-$ROOT/target/release/portcullis}"
DURATION="${DURATION:-10}"            # seconds per scenario
CONNS="${CONNS:-32}"                  # main pass
CONNS_HIGH="${CONNS_HIGH:-256}"       # second pass for the latency target
DISTINCT="${DISTINCT:-0}"             # distinct tokens to mint; 0 = enough for the run
# Preset of the distinct tokens. bitbucket-pipelines (default): every token names another
# pipeline run and step, so each is another principal and costs an assertion signature;
# github-actions: one job's tokens (only jti differs), which share one assertion.
DISTINCT_PRESET="${DISTINCT_PRESET:-bitbucket-pipelines}"
ONLY="${ONLY:-}"
PROFILE="${PROFILE:-}"                # "scenario:file": perf record the proxy during that scenario
LOAD_CPU="${LOAD_CPU:-0}"
PROXY_CPU="${PROXY_CPU:-1}"

# The peers' ports are fixed by their templates (benches/peers/); portcullis's may be moved.
UP=127.0.0.1:9000
NGINX_PROXY=127.0.0.1:18081
NGINX_TLS=127.0.0.1:18444
HAPROXY_PLAIN=127.0.0.1:18091
HAPROXY_JWT=127.0.0.1:18092
PC_HTTP="${PC_HTTP:-127.0.0.1:18100}"
PC_HTTPS="${PC_HTTPS:-127.0.0.1:18443}"
PC_ADMIN="${PC_ADMIN:-127.0.0.1:18190}"
FLOOR="${FLOOR:-127.0.0.1:18200}"

log() { printf '%s\n' "$*" >&2; }
die() { log "load.sh: $*"; exit 1; }

# --- tools --------------------------------------------------------------------------
need=()
for t in wrk nginx haproxy; do command -v "$t" >/dev/null || need+=("$t"); done
if ((${#need[@]})); then
  [[ $(id -u) == 0 ]] || die "missing ${need[*]}; run as root or install them"
  log "installing ${need[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v openssl >/dev/null || die "openssl is needed to export the issuer's public key"
command -v taskset >/dev/null || die "taskset (util-linux) is needed"
if [[ ! -x $BIN ]]; then
  log "building $BIN (cargo build --release)"
  (cd "$ROOT" && cargo build --release --quiet)
fi
for p in ${UP##*:} ${NGINX_PROXY##*:} ${NGINX_TLS##*:} ${HAPROXY_PLAIN##*:} ${HAPROXY_JWT##*:} \
  ${PC_HTTP##*:} ${PC_HTTPS##*:} ${PC_ADMIN##*:} ${FLOOR##*:}; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is already in use"; fi
done

# --- scratch directory and cleanup -----------------------------------------------------
RUN=$(mktemp -d /tmp/portcullis-load.XXXXXX)
KEYS="$RUN/keys"
STATE="$RUN/demo"
mkdir -p "$RUN/logs" "$RUN/tmp" "$KEYS" "$STATE"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -z ${KEEP_RUN:-} ]]; then rm -rf "$RUN"; else log "kept $RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # addr [seconds]
  local i
  for ((i = 0; i < ${2:-30} * 10; i++)); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listens on $1 (logs in $RUN/logs)"
}

render() { # template out workers
  sed -e "s#@RUN@#$RUN#g" -e "s#@KEYS@#$KEYS#g" -e "s#@WORKERS@#$3#g" -e "s#@THREADS@#$3#g" \
    "$PEERS/$1" >"$2"
}

# --- portcullis demo: dev issuer + proxy, audit log ON (stdout to a file) -------------
log "starting portcullis (state in $STATE)"
taskset -c "$PROXY_CPU" "$BIN" demo --insecure-http "$PC_HTTP" --upstream "http://$UP" \
  --listen "$PC_HTTPS" --admin "$PC_ADMIN" --state-dir "$STATE" \
  >"$RUN/logs/portcullis.audit.jsonl" 2>"$RUN/logs/portcullis.err" &
PC_PID=$!
PIDS+=("$PC_PID")
for ((i = 0; i < 300; i++)); do
  grep -q '^ready' "$RUN/logs/portcullis.audit.jsonl" 2>/dev/null && break
  kill -0 "$PC_PID" 2>/dev/null || die "portcullis exited: $(tail -5 "$RUN/logs/portcullis.err")"
  sleep 0.1
done
grep -q '^ready' "$RUN/logs/portcullis.audit.jsonl" || die "portcullis did not become ready"

# --- keys: the dev issuer's RS256 key for HAProxy, the proxy's certificate for nginx --
openssl pkey -inform DER -in "$STATE/issuer-key.pk8" -pubout -out "$KEYS/rsa_pub.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl ec -pubout -out "$KEYS/ec_pub.pem" 2>/dev/null
PKI=$(dirname "$(grep -o 'CA certificate: [^)]*' "$RUN/logs/portcullis.audit.jsonl" | head -1 | cut -d' ' -f3)")
cp "$PKI/server.pem" "$KEYS/tls_cert.pem"
cp "$PKI/server-key.pem" "$KEYS/tls_key.pem"
echo '{"keys":[]}' >"$KEYS/jwks.json"

# --- tokens --------------------------------------------------------------------------
tok() { "$BIN" dev token --state-dir "$STATE" "$@"; }
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
TOKEN=$(tok)
# HAProxy's template checks iss/aud of its own peer set-up; same key, same shape otherwise.
HA_TOKEN=$(tok --claim iss=https://issuer.peers.test --claim aud=peers-api)
EXPIRED=$(tok --claim exp:=1000000000 --claim iat:=999999000)
# A correctly signed token whose header names RS384, which the issuer does not allow.
WRONG_ALG="$(printf '{"alg":"RS384","kid":"demo-key-1"}' | b64url).${TOKEN#*.}"
MALFORMED="eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"
if [[ $DISTINCT == 0 ]]; then
  # Enough for the run at up to ~16k req/s (cache hits are counted and reported); minted on both cores before anything runs.
  DISTINCT=$((DURATION * 16000))
fi
log "minting $DISTINCT distinct $DISTINCT_PRESET tokens"
half=$((DISTINCT / 2))
tok --preset "$DISTINCT_PRESET" --count "$half" >"$RUN/tokens.a" &
tok --preset "$DISTINCT_PRESET" --count "$((DISTINCT - half))" >"$RUN/tokens.b"
wait $!
cat "$RUN/tokens.a" "$RUN/tokens.b" >"$RUN/tokens"
rm -f "$RUN/tokens.a" "$RUN/tokens.b"

# --- peers ---------------------------------------------------------------------------
log "starting nginx upstream, nginx proxies, HAProxy"
render nginx-upstream.conf.tmpl "$RUN/nginx-upstream.conf" 1
render nginx-proxy.conf.tmpl "$RUN/nginx-proxy.conf" 1
render nginx-proxy-tls.conf.tmpl "$RUN/nginx-tls.conf" 1
render haproxy.cfg.tmpl "$RUN/haproxy.cfg" 1
taskset -c "$LOAD_CPU" nginx -e "$RUN/logs/nu.err" -c "$RUN/nginx-upstream.conf" -g 'daemon off;' &
PIDS+=($!)
taskset -c "$PROXY_CPU" nginx -e "$RUN/logs/np.err" -c "$RUN/nginx-proxy.conf" -g 'daemon off;' &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
taskset -c "$PROXY_CPU" nginx -e "$RUN/logs/nt.err" -c "$RUN/nginx-tls.conf" -g 'daemon off;' &
NGINX_TLS_PID=$!
PIDS+=("$NGINX_TLS_PID")
taskset -c "$PROXY_CPU" haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/logs/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
# The floor: portcullis's own HTTP server + pooled client, nothing else (no identity,
# policy, header work or audit) — what hyper/tokio cost before portcullis does anything.
taskset -c "$PROXY_CPU" "$BIN" dev floor --listen "$FLOOR" --upstream "http://$UP" \
  >"$RUN/logs/floor.out" 2>&1 &
FLOOR_PID=$!
PIDS+=("$FLOOR_PID")
for a in $FLOOR $UP $NGINX_PROXY $NGINX_TLS $HAPROXY_PLAIN $HAPROXY_JWT $PC_HTTP $PC_HTTPS; do wait_port "$a"; done

# --- sanity: each scenario answers what it should ------------------------------------
status() { curl -sk -o /dev/null -w '%{http_code}' "$@"; }
expect() { # code args...
  local want=$1 got
  shift
  got=$(status "$@")
  [[ $got == "$want" ]] || die "expected $want from curl $*, got $got"
}
command -v curl >/dev/null && {
  expect 200 "http://$UP/"
  expect 200 "http://$NGINX_PROXY/"
  expect 200 "https://$NGINX_TLS/"
  expect 200 "http://$HAPROXY_PLAIN/"
  expect 200 "http://$FLOOR/"
  expect 200 -H "Authorization: Bearer $HA_TOKEN" "http://$HAPROXY_JWT/"
  expect 401 -H "Authorization: Bearer $MALFORMED" "http://$HAPROXY_JWT/"
  expect 200 -H "Authorization: Bearer $TOKEN" "http://$PC_HTTP/"
  expect 200 -H "Authorization: Bearer $TOKEN" "https://$PC_HTTPS/"
  expect 401 -H "Authorization: Bearer $MALFORMED" "http://$PC_HTTP/"
  expect 401 -H "Authorization: Bearer $EXPIRED" "http://$PC_HTTP/"
  expect 401 -H "Authorization: Bearer $WRONG_ALG" "http://$PC_HTTP/"
}

# --- measurement ---------------------------------------------------------------------
TCK=$(getconf CLK_TCK)
proc_ticks() { # pid... → utime+stime of the processes and their children processes
  local total=0 p f
  for p in "$@"; do
    for f in /proc/"$p"/stat $(pgrep -P "$p" | sed 's#.*#/proc/&/stat#'); do
      [[ -r $f ]] || continue
      # Fields after the ")" of comm: state is $1, utime $12, stime $13.
      total=$((total + $(sed 's/.*) //' "$f" | awk '{print $12 + $13}')))
    done
  done
  echo "$total"
}
cache_hits() {
  curl -s "http://$PC_ADMIN/metrics" | awk '/^portcullis_token_cache_hits_total/ {print $2}'
}

RESULTS="$RUN/results"
: >"$RESULTS"
run() { # name conns pid url [env...]
  local name=$1 conns=$2 pid=$3 url=$4
  shift 4
  if [[ -n $ONLY && " $ONLY " != *" $name "* ]]; then return; fi
  local before after out line hits0 hits1
  hits0=$(cache_hits)
  if [[ -n $PROFILE && ${PROFILE%%:*} == "$name" && $conns == "$CONNS" ]]; then
    (sleep 1; perf record -F 2000 ${PROFILE_CG:--g} -p "$pid" -o "${PROFILE#*:}" -- sleep $((DURATION - 2)) \
      >/dev/null 2>&1) &
  fi
  before=$(proc_ticks "$pid")
  out=$(env "$@" taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s \
    -s "$ROOT/benches/load.lua" "$url" 2>&1)
  after=$(proc_ticks "$pid")
  hits1=$(cache_hits)
  line=$(grep '^BENCH' <<<"$out") || die "wrk failed for $name: $out"
  # shellcheck disable=SC2086
  local $(sed 's/^BENCH //' <<<"$line")
  local cpu_us=$(((after - before) * 1000000 / TCK))
  printf '%s %s %s %s %s %s %s %s %s %s\n' "$name" "$conns" "$requests" "$duration_us" \
    "$p50_us" "$p99_us" "$cpu_us" "$non2xx" "$sockerr" "$((hits1 - hits0))" >>"$RESULTS"
  log "$(printf '%-22s c=%-4s %8d req  p50 %6d µs  p99 %6d µs  cpu %7.1f µs/req  non2xx %d' \
    "$name" "$conns" "$requests" "$p50_us" "$p99_us" \
    "$(awk -v c="$cpu_us" -v r="$requests" 'BEGIN{print r ? c / r : 0}')" "$non2xx")"
  sleep 1
}

log "running: ${DURATION}s per scenario, wrk -t1 -c$CONNS (and -c$CONNS_HIGH), load on CPU $LOAD_CPU, proxy on CPU $PROXY_CPU"
UPSTREAM_PID=${PIDS[1]}
for c in "$CONNS" "$CONNS_HIGH"; do
  run direct-nginx "$c" "$UPSTREAM_PID" "http://$UP/"
  run nginx-proxy "$c" "$NGINX_PID" "http://$NGINX_PROXY/"
  run haproxy-plain "$c" "$HAPROXY_PID" "http://$HAPROXY_PLAIN/"
  run haproxy-jwt "$c" "$HAPROXY_PID" "http://$HAPROXY_JWT/" BENCH_TOKEN="$HA_TOKEN"
  run hyper-floor "$c" "$FLOOR_PID" "http://$FLOOR/"
  run pc-reused "$c" "$PC_PID" "http://$PC_HTTP/" BENCH_TOKEN="$TOKEN"
  if [[ $c == "$CONNS" ]]; then
    run pc-distinct "$c" "$PC_PID" "http://$PC_HTTP/" BENCH_TOKENS="$RUN/tokens"
    run pc-reject-malformed "$c" "$PC_PID" "http://$PC_HTTP/" BENCH_TOKEN="$MALFORMED"
    run pc-reject-expired "$c" "$PC_PID" "http://$PC_HTTP/" BENCH_TOKEN="$EXPIRED"
    run pc-reject-wrong-alg "$c" "$PC_PID" "http://$PC_HTTP/" BENCH_TOKEN="$WRONG_ALG"
  fi
  run nginx-tls-proxy "$c" "$NGINX_TLS_PID" "https://$NGINX_TLS/"
  run pc-tls-reused "$c" "$PC_PID" "https://$PC_HTTPS/" BENCH_TOKEN="$TOKEN"
done
grep -c '"kind":"http"' "$RUN/logs/portcullis.audit.jsonl" | xargs printf 'audit events written by portcullis: %s\n' >&2

# --- table ---------------------------------------------------------------------------
# CPU ratios: vs nginx plain proxy at the same connection count, and vs HAProxy jwt_verify.
awk -v tck="$TCK" '
  { name[NR]=$1; conns[NR]=$2; req[NR]=$3; dur[NR]=$4; p50[NR]=$5; p99[NR]=$6; cpu[NR]=$7;
    non2xx[NR]=$8; hits[NR]=$10;
    cpr[NR] = $3 ? $7 / $3 : 0
    if ($1 == "nginx-proxy") { ng[$2] = cpr[NR]; ngp99[$2] = $6; ngrps[$2] = $3 / ($4 / 1e6) }
    if ($1 == "haproxy-jwt") { hj[$2] = cpr[NR] } }
  END {
    printf "| scenario | conns | req/s | p50 ms | p99 ms | p99 − nginx p99 | proxy CPU µs/req | × nginx proxy CPU | × HAProxy jwt CPU | req/s ÷ nginx | non-2xx | cache hits |\n"
    printf "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    for (i = 1; i <= NR; i++) {
      rps = dur[i] ? req[i] / (dur[i] / 1e6) : 0
      c = conns[i]
      printf "| %s | %d | %.0f | %.2f | %.2f | %s | %.1f | %s | %s | %s | %d | %s |\n",
        name[i], c, rps, p50[i] / 1000, p99[i] / 1000,
        (c in ngp99) ? sprintf("%+.2f ms", (p99[i] - ngp99[c]) / 1000) : "-",
        cpr[i],
        (c in ng && ng[c] > 0) ? sprintf("%.2f", cpr[i] / ng[c]) : "-",
        (c in hj && hj[c] > 0) ? sprintf("%.2f", cpr[i] / hj[c]) : "-",
        (c in ngrps && ngrps[c] > 0) ? sprintf("%.2f", rps / ngrps[c]) : "-",
        non2xx[i], (name[i] ~ /^pc-/) ? hits[i] : "-"
    }
  }' "$RESULTS"
