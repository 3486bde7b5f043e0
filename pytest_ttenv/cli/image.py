"""``ttenv image list|pull|import|build|rm``: the local image store."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.cli.backends import local_backend
from pytest_ttenv.cli.options import duration, local_options, size
from pytest_ttenv.cli.output import out, when
from pytest_ttenv.cli.progress import ByteBar, sized_terminal
from pytest_ttenv.core.naming import ARCHES, canonical_arch, host_arch, parse_mib
from pytest_ttenv.core.paths import image_dir
from pytest_ttenv.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="images in the store (--available: what can be pulled)")
    local_options(p)
    p.add_argument("--available", action="store_true", help="the catalog's images, for this host's arch and others")
    p = actions.add_parser("pull", help="download a vendor cloud image from the catalog")
    local_options(p)
    p.add_argument("names", nargs="+", metavar="NAME", help="ubuntu-24.04 (with --arch) or ubuntu-24.04-aarch64")
    p.add_argument("--arch", help=f"{', '.join(ARCHES)} (default: the name's, else this host's)")
    p.add_argument(
        "--timeout",
        type=duration("--timeout"),
        default=30.0,
        help="how long to wait for a connection or data: seconds, or 90s, 2m (default 30)",
    )
    p = actions.add_parser("import", help="add your own qcow2 or raw disk as an image")
    local_options(p)
    p.add_argument("file", help="the disk: qcow2 or raw (or vmdk, vdi, vhdx, vpc)")
    p.add_argument("--name", required=True, help="canonical <os>-<version>-<arch>, e.g. myos-1.0-x86_64")
    p.add_argument("--user", default="root", help="login user, created by cloud-init (default root)")
    p.add_argument("--boot", default="bios", choices=("bios", "uefi", "direct"), help="how it boots (default bios)")
    p.add_argument("--kernel", help="kernel for --boot direct")
    p.add_argument("--initrd", help="initrd for --boot direct")
    p.add_argument("--cmdline", help="kernel command line for --boot direct")
    p.add_argument("--force", action="store_true", help="replace an image of that name")
    p = actions.add_parser("build", help="build a Debian image with mmdebstrap")
    local_options(p)
    p.add_argument("target", help="debian-11, debian-12 or debian-13")
    p.add_argument("--arch", default=platform.machine(), help=f"{', '.join(ARCHES)} (default: this host's)")
    p.add_argument("--mirror", help="Debian mirror URL (default: the one this host's apt uses)")
    p.add_argument("--disk", type=size("--disk"), default="3G", help="root file system size: MiB, or 2G (default 3G)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line of the bootstrap")
    p.add_argument("--plain", action="store_true", help="untuned reference image (Debian defaults), for benchmarks")
    p.add_argument(
        "--variant",
        choices=("tuned", "plain", "cloud"),
        help="cloud: vendor-style (GRUB, cloud-init), named debiancloud-<version>-<arch>",
    )
    p = actions.add_parser("rm", help="remove images")
    local_options(p)
    p.add_argument("names", nargs="+")


def run(args: argparse.Namespace) -> int:
    action: Callable[[argparse.Namespace], int] = ACTIONS[args.image_command]
    return action(args)


def _store(args: argparse.Namespace) -> ImageStore:
    return ImageStore(image_dir(args.image_dir))


def cmd_list(args: argparse.Namespace) -> int:
    if args.available:
        return _list_available(args)
    images = _store(args).all()
    if not images:
        out(
            f"no images in {_store(args).root} - build one: ttenv image build debian-12, "
            "or pull one: ttenv image list --available"
        )
        return 0
    out(f"{'NAME':<22} {'FILE':>8} {'VIRTUAL':>8} {'USER':<10} {'BOOT':<6} {'SOURCE':<7} CREATED")
    for img in images:
        mib = img.file(img.disk).stat().st_size / 2**20 if img.file(img.disk).exists() else 0
        out(
            f"{img.name:<22} {mib:>6.0f}Mi {img.disk_mib:>6}Mi {img.user:<10} {img.boot:<6} {img.source:<7} "
            f"{when(img.created)}"
        )
    return 0


def _list_available(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.images.catalog import load_catalog

    catalog = load_catalog()
    have = {img.name: img for img in _store(args).all()}
    host = host_arch()  # an arch ttenv runs no guests for stays as it is: everything is "other"
    out(f"catalog {catalog.version} ({catalog.source}); pull with: ttenv image pull NAME")
    header = f"  {'NAME':<24} {'IN STORE':<10} {'USER':<10} {'BOOT':<5} {'FORMAT':<9} NOTES"
    for title, images in (
        (f"for this host ({host}):", [i for i in catalog.images() if i.arch == host]),
        ("for other arches (emulated, slower):", [i for i in catalog.images() if i.arch != host]),
    ):
        if not images:
            continue
        out(title)
        out(header)
        for img in images:
            source = have[img.name].source if img.name in have else ""
            state = {"": "-", "build": "built", "pull": "pulled", "import": "imported"}.get(source, source)
            out(f"  {img.name:<24} {state:<10} {img.user:<10} {img.boot:<5} {img.format:<9} {img.notes}".rstrip())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull each name in turn (all checked against the catalog first); Ctrl-C keeps the partial
    download for the next pull to resume, and exits 130."""
    from pytest_ttenv.backend.images.catalog import load_catalog
    from pytest_ttenv.backend.images.pull import pull

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    catalog = load_catalog()
    store = _store(args)
    images = [catalog.image(name, args.arch) for name in args.names]  # all names checked before any download
    for img in images:
        bar = ByteBar(img.name) if sized_terminal() else None
        try:
            pull(
                store,
                img.name,
                out,
                catalog=catalog,
                timeout=args.timeout,
                on_bytes=bar.update if bar and bar.usable else None,
            )
        except KeyboardInterrupt:
            if bar:
                bar.close()
            print(
                f"ttenv: interrupted; the partial download of {img.name} is kept in "
                f"{store.root / '.partial'} - rerun to resume",
                file=sys.stderr,
            )
            return 130
        finally:
            if bar:
                bar.close()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pytest_ttenv.backend.images.importer import import_image

    import_image(
        _store(args),
        args.file,
        args.name,
        user=args.user,
        boot=args.boot,
        force=args.force,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline or "",
        progress=out,
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build a Debian image; progress lines carry the seconds since the start (bootstrap detail
    only with ``--verbose``)."""
    from dataclasses import replace

    from pytest_ttenv.backend.images.build import ImageBuilder
    from pytest_ttenv.backend.images.recipe import parse_target

    arch = canonical_arch(args.arch)
    variant = "plain" if args.plain else args.variant or ""
    req = replace(parse_target(args.target, arch, variant), mirror=args.mirror, disk_mib=parse_mib(args.disk, "disk"))
    started = time.monotonic()

    def progress(line: str) -> None:
        if args.verbose or not line.startswith("  ") or line.startswith("  I: "):
            out(f"[{time.monotonic() - started:5.0f}s] {line.strip()}")

    ImageBuilder(local_backend(args).image_store, progress).build(req)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in args.names:
        store.remove(name)
        out(f"removed image {name}")
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list,
    "pull": cmd_pull,
    "import": cmd_import,
    "build": cmd_build,
    "rm": cmd_rm,
}
