#!/usr/bin/env bash
# Runs the worker's main job end to end on this machine: a small flash sale is queued in Redis
# (under a private key prefix, in a private database), `commerce-worker drain` decides it and
# persists it, and the results are checked and shown. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --quiet
bin=target/debug/commerce-worker
run_id="demo$$"
db="commerce_$run_id"
dir=$(mktemp -d)
trap 'redis-cli --scan --pattern "$run_id:*" | xargs -r redis-cli del >/dev/null; mariadb -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $db" || true; rm -rf "$dir"' EXIT

sed -e "s|^url = \"mysql://.*|url = \"mysql://root@127.0.0.1:3306/$db\"|" \
    -e "s|^spill_dir = .*|spill_dir = \"$dir/spill\"|" \
    -e "s|^format = \"json\"|format = \"text\"|" \
    -e "s#^\([a-z_]*\) = \"\(coupon:\|product:\)#\1 = \"$run_id:\2#" worker.toml > "$dir/worker.toml"
export WORKER_CONFIG="$dir/worker.toml"

$bin check-config >/dev/null
$bin migrate
coupons=3; stock=100; users=500
echo "demo: queueing $((coupons * users)) requests for $coupons coupons of $stock each, plus 2 malformed"
for c in $(seq 1 $coupons); do redis-cli set "$run_id:coupon:stock:$c" $stock >/dev/null; done
{
  for u in $(seq 1 $users); do
    for c in $(seq 1 $coupons); do echo "ZADD $run_id:coupon:queue NX $((u * 10 + c)) $u:$c"; done
  done
  echo "ZADD $run_id:coupon:queue NX 1 not-a-request"
  echo "ZADD $run_id:coupon:queue NX 2 12:007"
} | redis-cli --pipe >/dev/null
RUST_LOG=warn $bin drain

rows=$(mariadb -h127.0.0.1 -uroot -N "$db" -e "SELECT COUNT(*) FROM user_coupon")
dups=$(mariadb -h127.0.0.1 -uroot -N "$db" -e "SELECT COUNT(*) FROM (SELECT 1 FROM user_coupon GROUP BY user_id, coupon_id HAVING COUNT(*) > 1) d")
logs=$(mariadb -h127.0.0.1 -uroot -N "$db" -e "SELECT COUNT(*) FROM ranking_logs")
left=0; held=0
for c in $(seq 1 $coupons); do
  left=$((left + $(redis-cli get "$run_id:coupon:stock:$c")))
  held=$((held + $(redis-cli scard "$run_id:coupon:issued:$c")))
done
dead=$(redis-cli xlen "$run_id:coupon:dead")
echo "demo: user_coupon rows: $rows, holders in Redis: $held, stock left: $left, dead-lettered: $dead, ranking_logs rows: $logs"
ok=true
[ $((left + held)) -eq $((coupons * stock)) ] || { echo "demo: FAIL stock + holders != initial stock"; ok=false; }
[ "$held" -eq "$rows" ] || { echo "demo: FAIL holders != rows"; ok=false; }
[ "$dups" -eq 0 ] || { echo "demo: FAIL duplicate rows"; ok=false; }
[ "$dead" -eq 2 ] || { echo "demo: FAIL expected 2 dead letters"; ok=false; }
[ "$logs" -eq $((coupons * users)) ] || { echo "demo: FAIL expected one ranking_logs row per request"; ok=false; }
$ok && echo "demo: checks passed (conservation: initial = remaining + issued = rows; no duplicates; one log row per decided request)"
$ok
