#!/bin/sh
# Install Dovecot's IMAP server if it is missing. Idempotent; run as root (CI does, before
# pytest). Waits for another apt/dpkg run to release its lock instead of failing.
set -eu

if command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-dovecot: dovecot is missing and installing it needs root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# DPkg::Lock::Timeout makes apt wait for a concurrent install (apt >= 1.9, Debian 11+).
APT_WAIT="-o DPkg::Lock::Timeout=600"
# The lock timeout covers dpkg's lock, not the lists lock `update` takes: retry that.
tries=0
# shellcheck disable=SC2086
until apt-get $APT_WAIT update -qq; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "ensure-dovecot: apt-get update kept failing" >&2
        exit 1
    fi
    sleep 10
done
# shellcheck disable=SC2086
apt-get $APT_WAIT install -y -qq --no-install-recommends dovecot-imapd >/dev/null

# The package starts a system-wide dovecot on 143/993; the tests run their own, so stop it
# where a service manager exists (containers usually have none, and nothing was started).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet dovecot 2>/dev/null; then
    systemctl stop dovecot || true
fi

command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]
echo "ensure-dovecot: installed $(dovecot --version 2>/dev/null || echo dovecot)"
