"""pytest-ttenv: run a pytest suite on real VMs across an OS x CPU-architecture matrix."""

__version__ = "0.1.0"
