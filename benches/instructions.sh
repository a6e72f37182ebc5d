#!/usr/bin/env bash
# Instructions per request, counted by callgrind: the same figure on a quiet or a busy
# machine (wall-clock and CPU time are not), so two builds can be compared exactly.
#
#   benches/instructions.sh                       # this checkout's release build
#   BINS="/tmp/old/portcullis target/release/portcullis" benches/instructions.sh
#   SECONDS_PER_RUN=20 CONNS=8 benches/instructions.sh
#   KEEP=/tmp/cg benches/instructions.sh          # keep the callgrind files, for
#       callgrind_annotate --inclusive=yes /tmp/cg/demo-*.cg.*1 | head -80
#   CACHE_SIM=1 benches/instructions.sh           # also simulated cache misses per
#       request: valgrind's L1 and, as its last level, a 512 KiB 8-way cache standing for
#       one core's L2 (misses there go to the shared L3 or memory); about 2x slower.
#       The measured window includes opening CONNS connections (a first token hash
#       each): with CONNS=256 raise SECONDS_PER_RUN so that setup is amortized
#   DISTINCT=3000 benches/instructions.sh         # also the demo with a distinct token per
#       request (that many bitbucket-pipelines tokens cycled by load.lua: each a new
#       principal, so one RS256 verification and one ES256 signature per request)
#
# For each binary it runs `portcullis demo` (full validation, policy, identity headers,
# assertion, audit log) and `portcullis dev floor` (hyper server + pooled client only)
# under valgrind, warms up, turns instrumentation on, drives one reused token with wrk
# for SECONDS_PER_RUN, and divides the instructions counted by the requests served.
# The upstream is nginx `return 200` on 127.0.0.1:9000 (another process: not counted).
# Under valgrind, aws-lc's SHA-256 takes its portable path (no SHA extensions), so the
# token-cache key costs ≈ 38 k instructions here against ≈ 2 k natively; it is reported
# apart and left out of the "own" column (with DISTINCT, every SHA-256 is: the key's, the
# RSA verification's and the ES256 signature's digests).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-15}
CACHE_SIM=${CACHE_SIM:-0}
SIM=()
((CACHE_SIM)) && SIM=(--cache-sim=yes --LL=524288,8,64)
DISTINCT=${DISTINCT:-0}
CONNS=${CONNS:-8}
BINS=${BINS:-target/release/portcullis}
for t in valgrind callgrind_annotate callgrind_control wrk nginx; do
  command -v "$t" >/dev/null || { echo "instructions.sh: needs $t (apt-get install valgrind wrk nginx)" >&2; exit 1; }
done
[[ $BINS != target/release/portcullis ]] || cargo build --release --quiet

RUN=$(mktemp -d /tmp/portcullis-instr.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "valgrind.*$RUN" 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT
mkdir -p "$RUN/tmp"

cat >"$RUN/up.conf" <<EOF
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $RUN/tmp;
    proxy_temp_path $RUN/tmp;
    fastcgi_temp_path $RUN/tmp;
    uwsgi_temp_path $RUN/tmp;
    scgi_temp_path $RUN/tmp;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:9000;
        location / { default_type text/plain; return 200 "ok"; }
    }
}
EOF
nginx -e "$RUN/nginx.err" -c "$RUN/up.conf" -g 'daemon off;' &
PIDS+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/9000) 2>/dev/null && break; sleep 0.1; done

# measure NAME URL TOKEN command...: prints "instructions-per-request sha-per-request".
# TOKEN: `none`, `-` (one token minted from the demo's state), or `distinct` (warm up
# with one minted token, then measure with DISTINCT tokens, one per request).
measure() {
  local name=$1 url=$2 token=$3
  shift 3
  local out="$RUN/$name"
  valgrind --tool=callgrind "${SIM[@]}" --instr-atstart=no --callgrind-out-file="$out.cg" "$@" \
    >"$out.stdout" 2>"$out.stderr" &
  local vpid=$!
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/${url#http://}") 2>/dev/null && break
    sleep 0.2
  done
  local tokens=()
  if [[ $token == distinct ]]; then
    "$1" dev token --state-dir "$RUN/demo" --count "$DISTINCT" >"$out.tokens"
    tokens=(-s benches/load.lua)
  fi
  [[ $token == - || $token == distinct ]] && token=$("$1" dev token --state-dir "$RUN/demo")
  local hdr=(-H "Authorization: Bearer $token")
  wrk -t1 -c"$CONNS" -d3s "${hdr[@]}" "$url/" >/dev/null
  callgrind_control -i on "$vpid" >/dev/null
  if ((${#tokens[@]})); then
    BENCH_TOKENS="$out.tokens" wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "${tokens[@]}" "$url/" >"$out.wrk"
  else
    wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" "${hdr[@]}" "$url/" >"$out.wrk"
  fi
  callgrind_control -d "$vpid" >/dev/null
  sleep 1
  kill "$vpid" 2>/dev/null || true
  wait "$vpid" 2>/dev/null || true
  local n total sha
  n=$(awk '/requests in/ {print $1}' "$out.wrk")
  if ((${#tokens[@]} && n > DISTINCT)); then
    echo "warning: $name served $n requests with $DISTINCT tokens: raise DISTINCT" >&2
  fi
  total=$(callgrind_annotate "$out.cg".*1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  sha=$(callgrind_annotate "$out.cg".*1 2>/dev/null | awk '/sha256_block_data_order/ && !done {gsub(",", "", $1); print $1; done = 1}')
  grep -q '"status":200' "$out.stdout" 2>/dev/null || [[ $name == floor* ]] \
    || echo "warning: no 200 in the audit log of $name" >&2
  if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && cp "$out.cg".*1 "$KEEP/"; fi
  local l2=0
  if ((CACHE_SIM)); then
    # Misses of the simulated L2 (valgrind's last level): instruction, data read, data write.
    l2=$(callgrind_annotate "$out.cg".*1 2>/dev/null | awk '/PROGRAM TOTALS/ {
      gsub(",", ""); gsub(/\([^)]*\)/, ""); print $7 + $8 + $9 }')
  fi
  echo "$((total / n)) $((${sha:-0} / n)) $((l2 / n))"
}

distinct_demo() { # binary: the demo with a distinct token per request
  rm -rf "$RUN/demo"
  measure "distinct-$$-$RANDOM" http://127.0.0.1:18101 distinct \
    "$1" demo --insecure-http 127.0.0.1:18101 --upstream http://127.0.0.1:9000 \
    --listen 127.0.0.1:18444 --admin 127.0.0.1:18191 --state-dir "$RUN/demo"
}

printf '%-40s %14s %14s %14s' binary "floor instr/req" "demo instr/req" "demo own*"
((CACHE_SIM)) && printf ' %14s %14s' "floor L2 miss" "demo L2 miss"
((DISTINCT)) && printf ' %16s %16s' "distinct instr" "distinct own*"
printf '\n'
for bin in $BINS; do
  read -r floor _ floor_l2 < <(measure "floor-$$-$RANDOM" http://127.0.0.1:18201 none \
    "$bin" dev floor --listen 127.0.0.1:18201 --upstream http://127.0.0.1:9000)
  rm -rf "$RUN/demo"
  read -r demo sha demo_l2 < <(measure "demo-$$-$RANDOM" http://127.0.0.1:18101 - \
    "$bin" demo --insecure-http 127.0.0.1:18101 --upstream http://127.0.0.1:9000 \
    --listen 127.0.0.1:18444 --admin 127.0.0.1:18191 --state-dir "$RUN/demo")
  printf '%-40s %14d %14d %14d' "$bin" "$floor" "$demo" "$((demo - sha))"
  ((CACHE_SIM)) && printf ' %14d %14d' "$floor_l2" "$demo_l2"
  if ((DISTINCT)); then
    read -r distinct dsha _ < <(distinct_demo "$bin")
    printf ' %16d %16d' "$distinct" "$((distinct - dsha))"
  fi
  printf '\n'
done
echo "* demo own = demo minus the token-cache key's SHA-256 (software under valgrind)"
if ((CACHE_SIM)); then echo "  L2 miss = misses per request of the simulated 512 KiB last-level cache (I + D read + D write)"; fi
if ((DISTINCT)); then echo "  distinct own = distinct minus every SHA-256 (the key's, RS256's, ES256's)"; fi
