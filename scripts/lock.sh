#!/usr/bin/env bash
# Re-resolve the locks in requirements/ from pyproject.toml with today's newest versions (uv, in
# the project virtualenv). Run it, then `bash scripts/test.sh` to see the new versions pass, and
# commit both files. runtime.lock: what the main job installs; test.lock: every extra and the
# dev dependency groups (pytest plugins, ruff, mypy), for the test command and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$TTENV_PY" -m pip install -q uv
uv=("$TTENV_PY" -m uv pip compile pyproject.toml --universal --python-version 3.10 --generate-hashes --no-header
    --upgrade --quiet)
"${uv[@]}" --all-extras --group dev -o requirements/test.lock
# the runtime lock takes the test lock's versions, so the main job never changes a test venv
"${uv[@]}" -c requirements/test.lock -o requirements/runtime.lock
echo "lock: requirements/runtime.lock and requirements/test.lock re-resolved; run scripts/test.sh, then commit them"
