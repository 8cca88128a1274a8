#!/usr/bin/env bash
# README command 2: install what the tests need (first run only) and run the whole suite,
# then the linters. Extra arguments go to pytest, e.g. scripts/test.sh -k crisis -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
scripts/ensure-services.sh
.venv/bin/ruff check helpdesk tests bench alembic
.venv/bin/ruff format --check helpdesk tests bench alembic
.venv/bin/mypy
exec .venv/bin/pytest "$@"
