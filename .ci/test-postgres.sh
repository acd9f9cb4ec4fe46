#!/usr/bin/env bash
# Start the Debian PostgreSQL cluster on loopback for the store tests and print a URL the tests can
# use to create their own databases (CHATBOT_TEST_POSTGRES_URL). Idempotent: an existing cluster and
# role are reused. Prints nothing (exit 0) where it cannot start one (not root, no server packages):
# the PostgreSQL tests then skip, or fail when CHATBOT_REQUIRE_POSTGRES=1 (as .ci/run sets).
set -euo pipefail
role=chatbot_test
password=chatbot_test
command -v pg_lsclusters >/dev/null 2>&1 || { echo "test-postgres: PostgreSQL server packages are not installed" >&2; exit 0; }
[ "$(id -u)" = 0 ] || { echo "test-postgres: not root; cannot start PostgreSQL" >&2; exit 0; }
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
[ -n "$ver" ] || { echo "test-postgres: no PostgreSQL server version under /usr/lib/postgresql" >&2; exit 0; }
cluster() { pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $'"$1"'}'; }
if [ -z "$(cluster 2)" ]; then
  pg_createcluster "$ver" main >/dev/null
fi
if [ "$(cluster 4)" != "online" ]; then
  pg_ctlcluster "$ver" main start >&2
fi
port=$(cluster 3)
for _ in $(seq 1 30); do
  runuser -u postgres -- pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 1
done
runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 -d postgres >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN
    CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password';
  END IF;
END \$\$;
SQL
echo "postgresql+psycopg://$role:$password@127.0.0.1:$port/postgres"
