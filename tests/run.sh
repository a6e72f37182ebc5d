#!/usr/bin/env bash
# The test command: installs what is missing, then runs every check and test.
# `bash tests/run.sh` — the same command CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "== setup"
bash tests/setup.sh

echo "== format"
cargo fmt --all -- --check

echo "== lint"
cargo clippy --all-targets --locked -- -D warnings

echo "== docs"
# Broken or private intra-doc links are errors (the crate's docs are its architecture
# notes); no dependency docs are built.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --quiet

echo "== tests"
# Interop tests must not skip here: the setup above installed what they need.
export PORTCULLIS_REQUIRE_INTEROP=1
cargo test --all-targets --locked

echo "== shipped configs and policies"
for cfg in examples/*/portcullis.toml examples/*.toml; do
  [ -f "$cfg" ] || continue
  cargo run --quiet --locked -- check -c "$cfg" >/dev/null
done
echo "all checks passed"
