#!/usr/bin/env bash
# The worker's main job end to end: starts local Redis/MariaDB if none answers (installing the
# Debian packages if missing), then `commerce-worker demo` plays the API's part against them —
# a flash sale and a few days of orders, in a private key prefix and database removed afterwards
# — runs the real jobs with progress bars and prints a report with the checks it verified.
# Extra arguments go to `demo` (see `commerce-worker demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# The demo only needs the servers from worker.toml; text logs suit a terminal.
export WORKER_CONFIG="${WORKER_CONFIG:-worker.toml}"
cargo run --quiet -- demo "$@"
