#!/usr/bin/env bash
# README command 1: install what the demo needs (first run only) and run `helpdesk demo`:
# SQLite, an in-process IMAP server and SMTP receiver, seeded patient mail, the web UI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/helpdesk demo "$@"
