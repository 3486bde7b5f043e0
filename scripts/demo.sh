#!/usr/bin/env bash
# The main job on the embedded default: the local qemu engine, Debian 11/12/13 images built on
# first use (progress shown), the example suite run on one VM per image, the matrix printed.
# Extra arguments go to pytest (e.g. -n 2, --tt-keep=failed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest examples -p no:cacheprovider --tt-os="${TTENV_OS:-debian11,debian12,debian13}" \
  --tt-arch="${TTENV_ARCH:-$(uname -m)}" --tt-matrix-report=ttenv-matrix.md "$@"
