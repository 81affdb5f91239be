#!/usr/bin/env bash
# Redis and PostgreSQL for thrifty's shared-state mode (tests, a local multi-replica setup).
#
#   scripts/services.sh install                    apt-get install redis-server postgresql (if missing)
#   scripts/services.sh start DIR [redis|postgres|all]
#                                                  start them on free 127.0.0.1 ports, data under DIR;
#                                                  prints REDIS_URL=... and POSTGRES_URL=... lines
#   scripts/services.sh stop DIR [redis|postgres|all]
#
# The servers never run as root: as root, the script creates a system user `thrifty-svc` and
# runs them as that user (PostgreSQL refuses root anyway). A restarted service keeps its port.
set -euo pipefail

SVC_USER=thrifty-svc

die() { echo "services.sh: $*" >&2; exit 1; }

pg_bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

have_servers() { command -v redis-server >/dev/null 2>&1 && pg_bindir >/dev/null; }

install() {
  have_servers && return 0
  [ "$(id -u)" = 0 ] || die "redis-server or postgresql is missing; install them (as root: $0 install)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q redis-server postgresql >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q redis-server postgresql >/dev/null
  }
  have_servers || die "redis-server / postgresql still missing after apt-get install"
}

# Run a command as the unprivileged service user (or as ourselves when we are not root).
as_svc() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$SVC_USER" -- "$@"; else "$@"; fi
}

prepare_dir() {
  local dir=$1
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id -u "$SVC_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$SVC_USER"
    chown "$SVC_USER" "$dir"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_of() {  # the port a service used before in DIR, or a new free one
  local file=$1/$2.port
  [ -s "$file" ] || free_port >"$file"
  cat "$file"
}

wait_for() {  # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.05
  done
}

start_redis() {
  local dir=$1 port
  command -v redis-server >/dev/null || die "redis-server is not installed (run: $0 install)"
  port=$(port_of "$dir" redis)
  mkdir -p "$dir/redis"
  [ "$(id -u)" = 0 ] && chown "$SVC_USER" "$dir/redis"
  as_svc redis-server --bind 127.0.0.1 --port "$port" --dir "$dir/redis" --save '' --appendonly no \
    --daemonize yes --pidfile "$dir/redis/redis.pid" --logfile "$dir/redis/redis.log"
  wait_for 10 redis-cli -h 127.0.0.1 -p "$port" ping || die "redis did not start; see $dir/redis/redis.log"
  echo "REDIS_URL=redis://127.0.0.1:$port/0"
}

start_postgres() {
  local dir=$1 port bin data=$1/pg
  bin=$(pg_bindir) || die "postgresql is not installed (run: $0 install)"
  port=$(port_of "$dir" postgres)
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown "$SVC_USER" "$data"
    as_svc "$bin/initdb" -D "$data" -U thrifty -A trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
      || die "initdb failed; see $dir/initdb.log"
  fi
  # fsync off: only an OS crash could lose data, and these are test/dev instances.
  as_svc "$bin/pg_ctl" -D "$data" -l "$dir/pg.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off -c max_connections=200" start \
    >/dev/null || die "postgres did not start; see $dir/pg.log"
  as_svc "$bin/psql" -h 127.0.0.1 -p "$port" -U thrifty -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'thrifty'" | grep -q 1 \
    || as_svc "$bin/createdb" -h 127.0.0.1 -p "$port" -U thrifty thrifty
  echo "POSTGRES_URL=postgresql://thrifty@127.0.0.1:$port/thrifty"
}

stop_redis() {
  local dir=$1 pid
  [ -s "$dir/redis/redis.pid" ] || return 0
  pid=$(cat "$dir/redis/redis.pid")
  kill "$pid" 2>/dev/null || true
  wait_for 10 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/redis/redis.pid"
}

stop_postgres() {
  local dir=$1 bin
  [ -s "$dir/pg/postmaster.pid" ] || return 0
  bin=$(pg_bindir) || return 0
  as_svc "$bin/pg_ctl" -D "$dir/pg" -m fast -w -t 30 stop >/dev/null || true
}

cmd=${1:-}
case "$cmd" in
  install) install ;;
  start | stop)
    dir=${2:?usage: $0 $cmd DIR [redis|postgres|all]}
    which=${3:-all}
    [ "$cmd" = start ] && prepare_dir "$dir"
    case "$which" in
      redis) "${cmd}_redis" "$dir" ;;
      postgres) "${cmd}_postgres" "$dir" ;;
      all) "${cmd}_redis" "$dir"; "${cmd}_postgres" "$dir" ;;
      *) die "unknown service $which (redis, postgres or all)" ;;
    esac
    ;;
  *) die "usage: $0 install | start DIR [redis|postgres|all] | stop DIR [redis|postgres|all]" ;;
esac
