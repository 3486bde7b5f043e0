#!/usr/bin/env bash
# The project's test command: installs what the tests need, then lint, types and the suite
# (unit tests and end-to-end tests that boot real VMs). pytest's exit 5 (no tests) fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
python3 -m ruff check pytest_ttenv tests bench examples || exit 1
python3 -m mypy || exit 1
python3 -m pytest -p no:cacheprovider -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests - failing" >&2
  exit 1
fi
exit "$rc"
