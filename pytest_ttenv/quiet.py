"""Third-party imports that would otherwise print on a user's terminal.

asyncssh (up to at least 2.24) touches cryptography's deprecated DSA names while it is imported,
and cryptography >= 46 answers each touch with a ``CryptographyDeprecationWarning``: five warnings,
ten lines, before any output of ours. Every module of ours imports asyncssh from here, so the
warning is silenced once, narrowly (that category, raised from asyncssh's own modules, during
that import), and a project running pytest with ``filterwarnings = error`` is not broken by it.
Any other warning, from asyncssh or anyone else, still shows.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # pragma: no cover - cryptography is a dependency of asyncssh
        pass
    else:
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)")
    import asyncssh

__all__ = ["asyncssh"]
