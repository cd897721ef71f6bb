#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests against real Redis and MariaDB
# (started locally first if none answers). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --all-targets "$@"
