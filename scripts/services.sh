#!/usr/bin/env bash
# Starts the local PostgreSQL and MariaDB servers, and the message brokers (Redis, RabbitMQ, NATS with
# JetStream, Mosquitto), if they are installed here and not running, each with the command its Debian
# package uses. Used by CI; on a developer machine the integration tests skip a server they cannot reach.
set -uo pipefail
wait_for() {  # name, command, [seconds]
    for _ in $(seq 1 "${3:-30}"); do
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
port_open() {  # port: whether something listens on 127.0.0.1:port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
if command -v redis-server >/dev/null 2>&1 && ! port_open 6379; then
    echo "services: starting Redis"
    # Without persistence, as the tests want a broker that forgets between runs.
    redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes >/dev/null || true
    wait_for Redis "port_open 6379"
fi
if [ -x /etc/init.d/rabbitmq-server ] && ! port_open 5672; then
    echo "services: starting RabbitMQ"
    /etc/init.d/rabbitmq-server start >/dev/null 2>&1 || true
    wait_for RabbitMQ "port_open 5672" 90  # the Erlang node takes a while
fi
if [ -x /usr/sbin/nats-server ] && ! port_open 4222; then
    echo "services: starting NATS with JetStream"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
    wait_for NATS "port_open 4222"
fi
if command -v mosquitto >/dev/null 2>&1 && ! port_open 1883; then
    echo "services: starting Mosquitto"
    mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
    wait_for Mosquitto "port_open 1883"
fi
exit 0
