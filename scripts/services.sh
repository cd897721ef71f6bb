#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and MariaDB (127.0.0.1:3306, root, empty password) answer.
# Uses running services when they answer; otherwise installs the Debian packages if missing
# and starts local, non-persistent instances for development and tests.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_if_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  command -v mariadb >/dev/null || missing+=(mariadb-client)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "services: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done
  echo "services: nothing answers on port $1" >&2; return 1
}

if ! port_open 6379; then
  install_if_missing
  echo "services: starting redis-server on 127.0.0.1:6379 (no persistence)" >&2
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/commerce-worker-redis.log
  wait_port 6379
fi

if ! port_open 3306; then
  install_if_missing
  echo "services: starting MariaDB on 127.0.0.1:3306" >&2
  $SUDO mkdir -p /run/mysqld && $SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
  if [ ! -d /var/lib/mysql/mysql ]; then
    $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  wait_port 3306
  # Debian's root logs in through the unix socket only; tests connect over TCP as root with an
  # empty password, which this local development instance allows.
  if ! mariadb -h127.0.0.1 -uroot -e 'SELECT 1' >/dev/null 2>&1; then
    $SUDO mariadb -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
  fi
fi

# The fault tests start private servers with these.
if ! command -v mariadb-install-db >/dev/null || ! command -v redis-server >/dev/null; then
  install_if_missing
fi
# The test suite checks the live /metrics with promtool (Debian package prometheus; only its
# promtool is used, no server is started).
if ! command -v promtool >/dev/null; then
  echo "services: installing prometheus (for promtool)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
echo "services: redis and mariadb answer" >&2
