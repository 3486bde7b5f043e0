#!/usr/bin/env bash
# Install what pytest-ttenv needs on a Debian host: qemu, image build tools, ssh, libvirt, and the
# package itself with its test extras. Idempotent; run as root (or with sudo available). Nothing in
# /etc/libvirt is changed: the tests run libvirtd with config dirs of their own (tests/libvirt_hosts.py).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS=(qemu-system-x86 qemu-system-arm qemu-system-misc ovmf qemu-utils mmdebstrap e2fsprogs cpio zstd openssh-client
      openssh-server ca-certificates qemu-user-static binfmt-support arch-test)
TEST_PKGS=(chromium)  # the test suite opens the HTML report in it; the CI templates install PKGS only
# The libvirt engine and its tests: the daemons (started by the tests themselves, no systemd needed),
# virsh/virt-ssh-helper, and what pip needs to build libvirt-python; xmllint checks domain XML against
# libvirt's schema; iproute2 makes the tests' network namespace for a remote host.
LIBVIRT_PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc libxml2-utils
              iproute2)
missing=()
for p in "${PKGS[@]}" "${TEST_PKGS[@]}" "${LIBVIRT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
