#!/usr/bin/env bash
# Starts the local PostgreSQL and MariaDB servers if they are installed here and not running.
# Used by CI; on a developer machine the integration tests skip a server they cannot reach.
set -uo pipefail
wait_for() {  # name, command
    for _ in $(seq 1 30); do
        if eval "$2" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "services: $1 did not come up" >&2
    return 1
}
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        echo "services: starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
        wait_for PostgreSQL "pg_isready -q -h 127.0.0.1 -p 5432"
    fi
fi
if command -v mariadb-admin >/dev/null 2>&1 && ! mariadb-admin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    if [ -x /usr/sbin/mariadbd ]; then
        echo "services: starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
        wait_for MariaDB "mariadb-admin -h 127.0.0.1 -u root ping"
    fi
fi
exit 0
