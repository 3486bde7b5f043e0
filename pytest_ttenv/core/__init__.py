"""Vocabulary every layer may import: canonical names and the OS-prefix rule (``naming``), the
dataclasses the backend hands around (``model``), where files live on this host (``paths``), SSH
key pairs (``keys``) and the capture file of a failed VM (``capture_manifest``, ``capture_format``).

The rule of this folder: it imports only ``pytest_ttenv.errors``, ``pytest_ttenv.quiet`` and
third-party libraries - nothing of the backend, the SSH channel, the plugin or the server - so a
client module reads a name or a spec without loading engines, images or the seed ISO writer.
"""
