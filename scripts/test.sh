#!/usr/bin/env bash
# The project's test command: installs what the tests need (scripts/setup.sh --test: the locked
# versions into the project virtualenv), then lint, format (ruff format --check: the formatter formats,
# no line is held against it), types (the package, the tests and the
# benchmarks) and the suite (tests/unit: no VMs; tests/vm: end-to-end tests that boot real VMs).
# --latest tests the newest versions PyPI has instead of the lock; any other argument goes to
# pytest. pytest's exit 5 (no tests) fails.
set -uo pipefail
cd "$(dirname "$0")/.."
setup_args=(--test)
pytest_args=()
for arg in "$@"; do
  if [ "$arg" = "--latest" ]; then setup_args+=(--latest); else pytest_args+=("$arg"); fi
done
bash scripts/setup.sh "${setup_args[@]}" || exit 1
source scripts/venv.sh
"$TTENV_PY" -m ruff check pytest_ttenv tests bench examples || exit 1
"$TTENV_PY" -m ruff format --check pytest_ttenv tests bench examples || exit 1
"$TTENV_PY" -m mypy || exit 1  # strict over pytest_ttenv, tests and bench: pyproject's [tool.mypy] files
"$TTENV_PY" -m pytest -p no:cacheprovider -ra "${pytest_args[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests - failing" >&2
  exit 1
fi
exit "$rc"
