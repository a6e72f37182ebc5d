#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, and nothing when it is
# already there. Called by tests/run.sh (the README's test command) and so by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=0
need_apt() { # need_apt PACKAGE... : install the Debian packages that are missing
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ $apt_updated -eq 0 ]; then $sudo apt-get update -qq; apt_updated=1; fi
  # The tests start their own throwaway servers: keep the packages' services (nginx on
  # port 80, PostgreSQL on 5432, redis-server) from being started by their install,
  # which also fails the install when such a port is taken (policy-rc.d, exit 101: no
  # service starts), unless the machine already has a policy (container images do).
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
  [ -z "$policy" ] || $sudo rm -f "$policy"
  return $rc
}

# Chromium for the browser SSO test (tests/e2e/browser.mjs drives it with playwright-core).
need_apt chromium

# Node.js + npm for the real OpenID provider (oidc-provider) and the browser driver.
command -v node >/dev/null && command -v npm >/dev/null || need_apt nodejs npm
if [ ! -d tests/node/node_modules/oidc-provider ] || [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi

# Redis for the shared-store tests (tests/it/redis.rs; each starts its own throwaway
# redis-server on a free port).
command -v redis-server >/dev/null || need_apt redis-server

# nginx, put in front of the proxy by tests/it/upstream_abuse.rs (a web server in front
# must not take an upstream's X-Accel-Redirect as the proxy's).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt nginx

# PostgreSQL server, psql and pgbench for the database-route tests (tests/it/pg.rs) and
# benches/pg.sh. pgbench ships in postgresql-contrib on older Debian releases.
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt postgresql
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || need_apt postgresql-contrib
