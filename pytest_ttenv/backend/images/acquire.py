"""Obtaining the images a session needs that a local image store lacks.

``plan`` says which images a session's OS prefixes will use, reading only the store, the catalog
and the builder's recipe (no network, no tools): the store's images, then for each prefix that
matches none of them the images it matches that could be pulled or built. ``obtain`` gets the
missing ones by the source policy (``--tt-image-source``): ``pull`` pulls from the catalog and
builds Debian if its pull fails; ``build`` builds Debian and pulls the rest. The builder and the
puller are imported by ``obtain`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pytest_ttenv.backend.images.catalog import load_catalog
from pytest_ttenv.backend.images.recipe import buildable
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.naming import prefix_matches
from pytest_ttenv.errors import NotFound, TTError

SOURCES = ("pull", "build")  # the policies of ``obtain``; the first is the default


def plan(store: ImageStore, prefixes: Sequence[str], arches: Sequence[str]) -> list[str]:
    """The store's image names, then those ``obtain`` would fetch for ``prefixes`` on ``arches``.

    Only a prefix that matches no image of ``arches`` in the store asks for more: ``deb`` with
    Debian 12 present does not fetch 11 and 13.
    """
    have = store.names()
    obtainable = [*buildable(arches), *load_catalog().available(arches)]
    asking = [prefix for prefix in prefixes if not prefix_matches(prefix, have, arches)]
    return list(dict.fromkeys([*have, *(n for prefix in asking for n in prefix_matches(prefix, obtainable, arches))]))


def obtain(store: ImageStore, names: Sequence[str], source: str, progress: Callable[[str], None]) -> None:
    """Pull or build into ``store`` the images of ``names`` it lacks, by the policy ``source``
    (one of SOURCES), with progress lines. Before anything is fetched, one NotFound line names
    the images that neither the catalog nor the builder has."""
    if source not in SOURCES:
        raise ValueError(f"unknown image source {source!r}")
    have = set(store.names())
    missing = [n for n in dict.fromkeys(names) if n not in have]
    if not missing:
        return
    catalog = load_catalog()
    can_build = set(buildable())
    unknown = [n for n in missing if n not in can_build and n not in catalog]
    if unknown:
        raise NotFound(
            f"image(s) {', '.join(unknown)} not in {store.root} and not in the {catalog.where}",
            "ttenv image list --available shows what can be pulled; ttenv image build makes debian-<release>",
        )
    from pytest_ttenv.backend.images.build import ensure_images
    from pytest_ttenv.backend.images.pull import ensure_available

    for name in missing:
        if source == "build" and name in can_build:
            ensure_images(store, [name], progress=progress)
            continue
        try:
            ensure_available(store, [name], progress=progress, catalog=catalog)
        except TTError as exc:
            if name not in can_build:
                raise
            progress(f"pulling {name} failed ({exc}); building it instead")
            ensure_images(store, [name], progress=progress)
