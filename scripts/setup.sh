#!/usr/bin/env bash
# Install what pytest-ttenv needs on a Debian host, into the project virtualenv (scripts/venv.sh:
# an active one, or ./.venv), never into the system Python. Idempotent; run as root (or with sudo).
#   bash scripts/setup.sh            the main job: qemu for this host's arch, image build tools, ssh,
#                                    and the package from requirements/runtime.lock
#   bash scripts/setup.sh --test     also what the tests need: qemu for the other arches, UEFI
#                                    firmware, libvirt daemons, chromium, every extra and the dev
#                                    tools from requirements/test.lock
#   ... --latest                     the newest versions PyPI has instead of the lock (drift check)
# Nothing in /etc/libvirt is changed: the tests run libvirtd with config dirs of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
test_deps=0
latest=0
for arg in "$@"; do
  case "$arg" in
    --test) test_deps=1 ;;
    --latest) latest=1 ;;
    *) echo "setup: unknown argument $arg (use --test, --latest)" >&2; exit 2 ;;
  esac
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# What ttenv needs on a host: RUNTIME_PKGS, and qemu for the guests' arches (FOREIGN_PKGS: every
# arch, UEFI firmware and the binfmt emulation mmdebstrap needs to build a foreign-arch image). The
# main job boots host-arch VMs only, so it installs qemu for this arch; the CI templates install
# RUNTIME_PKGS and FOREIGN_PKGS (tests/unit/test_ci_templates_static.py holds them to these lists).
# qemu-system-s390x is a package of its own on Ubuntu; on Debian 12 qemu-system-misc provides it.
RUNTIME_PKGS=(qemu-utils mmdebstrap e2fsprogs cpio zstd openssh-client ca-certificates)
FOREIGN_PKGS=(qemu-system-x86 qemu-system-arm qemu-system-misc qemu-system-ppc qemu-system-s390x ovmf qemu-user-static
              binfmt-support arch-test)
case "$(uname -m)" in
  x86_64 | i?86) QEMU_HOST=qemu-system-x86 ;;
  aarch64 | arm*) QEMU_HOST=qemu-system-arm ;;
  ppc64le) QEMU_HOST=qemu-system-ppc ;;
  s390x) QEMU_HOST=qemu-system-s390x ;;
  *) QEMU_HOST=qemu-system-misc ;;
esac
PKGS=("${RUNTIME_PKGS[@]}" "$QEMU_HOST" python3-venv)
if [ "$test_deps" -eq 1 ]; then
  # An sshd for the channel tests, chromium for the HTML report test and (with chromium-driver,
  # through selenium) the dashboard's browser tests. The libvirt engine's tests:
  # the daemons (started by the tests, no systemd needed), virsh, what pip needs to build
  # libvirt-python, xmllint for domain XML against libvirt's schema, iproute2 for the remote host's
  # network namespace.
  PKGS+=("${FOREIGN_PKGS[@]}" openssh-server chromium chromium-driver libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
         libvirt-dev pkg-config gcc libxml2-utils iproute2)
fi
missing=()
for p in "${PKGS[@]}"; do  # a name another package provides (qemu-system-s390x) counts by its binary
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || command -v "$p" >/dev/null ||
    missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

source scripts/venv.sh
# What this venv holds is recorded in it, so the main job (runtime) leaves a venv alone that the
# test command filled with the same lock's versions or with --latest (the docs test runs demo.sh).
marker="$TTENV_VENV/ttenv-installed"
sum() { sha256sum "$1" | cut -c1-16; }
pip_log="$TTENV_VENV/pip-install.log"
pip() {  # pip's own chatter (build backends' warnings) goes to a log, shown only if pip fails
  if ! "$TTENV_PY" -m pip install -q --disable-pip-version-check "$@" >>"$pip_log" 2>&1; then
    tail -n 40 "$pip_log" >&2
    echo "setup: pip install $* failed (whole log: $pip_log)" >&2
    exit 1
  fi
}
: >"$pip_log"
if [ "$latest" -eq 1 ]; then
  extras=""
  groups=()
  if [ "$test_deps" -eq 1 ]; then
    extras="[server,libvirt,testinfra]"
    groups=(--group dev)
  fi
  echo "setup: resolving the newest versions (not the lock) into $TTENV_VENV"
  pip --upgrade pip
  pip --upgrade --upgrade-strategy eager -e ".$extras" "${groups[@]}"
  echo "latest" > "$marker"
elif [ "$test_deps" -eq 0 ] && grep -qxE "latest|test $(sum requirements/test.lock)" "$marker" 2>/dev/null; then
  echo "setup: $TTENV_VENV already holds the test environment ($(cat "$marker")); not changing it"
else
  lock=requirements/runtime.lock
  kind=runtime
  if [ "$test_deps" -eq 1 ]; then lock=requirements/test.lock; kind=test; fi
  echo "setup: installing $lock into $TTENV_VENV"
  pip --require-hashes -r "$lock"
  pip --no-deps -e .
  echo "$kind $(sum "$lock")" > "$marker"
fi
