"""Guest images: the store on disk and every way an image gets into it.

``store`` (one directory per image), ``catalog`` (+ ``catalog_entry``, ``catalog_schema``: the
vendor images ``pull`` knows), ``pull`` (+ ``download``, ``checksums``), ``build`` (+ ``recipe``:
what the Debian builder makes, ``build_cloud``, ``initramfs``, ``steps``), ``importer`` (your own
disk), and ``acquire`` (which images a session needs, and obtaining the missing ones).

The rule of this folder: its modules import only ``pytest_ttenv.core``, ``pytest_ttenv.errors``
(and the package ``__version__``), each other and third-party libraries - never an engine
(``backend.engines``), a backend (``backend.local``, ``backend.http``), the SSH channel or
anything above. Whoever boots images asks this folder for them; this folder boots nothing.
"""
