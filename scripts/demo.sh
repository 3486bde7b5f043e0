#!/usr/bin/env bash
# The main job on the embedded default: local qemu engine, Debian images built on first use,
# an ENV of one VM per image, a small check suite run on every VM, the matrix printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 examples/matrix_demo.py "$@"
