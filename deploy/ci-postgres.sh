#!/usr/bin/env bash
# Starts Debian's PostgreSQL for the indexer's tests and prints the URL they use.
# Idempotent: installs the package if missing, starts the cluster, creates the role.
set -euo pipefail
# Only the URL goes to standard output; everything else to standard error.
exec 3>&1 1>&2
if ! command -v pg_lsclusters >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
fi
version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
if [ -z "$version" ]; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  pg_createcluster "$version" main >/dev/null
fi
# The server is a daemon: it must not inherit this script's output pipes, or
# `url=$(bash deploy/ci-postgres.sh)` would wait for it to exit (fd 3 is the
# caller's command substitution; 1 and 2 may be CI's log pipe).
pg_ctlcluster "$version" main start </dev/null >/dev/null 2>&1 3>&- || true
for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
pg_isready -q -h 127.0.0.1 || { echo "PostgreSQL $version did not start: see /var/log/postgresql/"; exit 1; }
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_roles WHERE rolname='pylon'\" | grep -q 1 || psql -q -c \"CREATE ROLE pylon LOGIN SUPERUSER PASSWORD 'pylon'\"" >/dev/null
echo "postgres://pylon:pylon@127.0.0.1:5432/postgres" >&3
