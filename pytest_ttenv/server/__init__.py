"""The host server (``ttenv serve``): the local backend behind a REST API under ``/v1``.

``auth`` (tokens), ``quota`` (resource accounting), ``errors`` (exception -> status and JSON
body) and ``reaper`` need only the standard library; ``models``, ``app`` and ``serve`` need the
``server`` extra (FastAPI, uvicorn). docs/server.md is the API's specification.
"""
