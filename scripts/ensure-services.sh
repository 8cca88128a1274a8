#!/usr/bin/env bash
# Install and start what the test suite talks to, on a fresh Debian as root:
# Dovecot (IMAP; tests start their own instances), Chromium (browser tests) and a
# PostgreSQL on 127.0.0.1:5432 with trust auth and a database "test".
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v dovecot >/dev/null 2>&1 || need+=(dovecot-imapd)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_bin" ] || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)" >&2
  # wait for a concurrent apt/dpkg run instead of failing on its lock
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
if ! "$pg_bin/pg_isready" -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ls /etc/postgresql/*/main >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
  fi
fi
if ! "$pg_bin/pg_isready" -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  data=/tmp/helpdesk-pg
  echo "starting a throwaway PostgreSQL in $data on 127.0.0.1:5432" >&2
  if [ ! -f "$data/PG_VERSION" ]; then
    rm -rf "$data"; mkdir -p "$data"; chown postgres: "$data"
    su postgres -s /bin/sh -c "$pg_bin/initdb -D $data -U postgres --auth=trust" >/dev/null
  fi
  su postgres -s /bin/sh -c "$pg_bin/pg_ctl -D $data -w -l $data/log start -o '-c listen_addresses=127.0.0.1 -p 5432 -k $data -c fsync=off'" >/dev/null
fi
# A Debian-installed cluster answers but asks for a password on TCP: the tests connect as
# postgres without one, as on the development machines, so allow trust on loopback.
if ! "$pg_bin/psql" -h 127.0.0.1 -U postgres -d postgres -tAc "select 1" >/dev/null 2>&1; then
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hba" ] && ! grep -q "helpdesk-tests" "$hba"; then
    echo "allowing trust auth on 127.0.0.1 in $hba for the test suite" >&2
    sed -i "1i host all all 127.0.0.1/32 trust  # helpdesk-tests" "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main reload || true
  fi
fi
if [ "$("$pg_bin/psql" -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null)" != "1" ]; then
  "$pg_bin/psql" -h 127.0.0.1 -U postgres -d postgres -tAc "create database test" >/dev/null 2>&1 \
    || echo "warning: could not create database test" >&2
fi
