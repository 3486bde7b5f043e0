#!/usr/bin/env bash
# The main job on the embedded default: the local qemu engine, Debian 11/12/13 images built on
# first use with mmdebstrap (progress shown; --tt-image-source=build, so nothing is downloaded but
# Debian packages), the example suite run on one VM per image, the tests x VMs matrix printed (and
# kept in ttenv-matrix.md). Installs only the runtime (scripts/setup.sh). Extra arguments go to
# pytest (e.g. -n 2 after installing pytest-xdist, --tt-keep=failed).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
source scripts/venv.sh
rm -f ttenv-matrix.md
rc=0
"$TTENV_PY" -m pytest -c examples/demo.ini --rootdir . examples -p no:cacheprovider --tt-os="${TTENV_OS:-debian11,debian12,debian13}" \
  --tt-arch="${TTENV_ARCH:-$(uname -m)}" --tt-image-source=build --tt-matrix-report=ttenv-matrix.md "$@" || rc=$?
if [ -f ttenv-matrix.md ]; then
  echo
  cat ttenv-matrix.md
fi
exit "$rc"
