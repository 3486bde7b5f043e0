"""``python -m pytest_ttenv.cli``: the ``ttenv`` command without its console script."""

import sys

from pytest_ttenv.cli import main

sys.exit(main())
