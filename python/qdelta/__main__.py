"""``python -m qdelta``: the ``qdelta`` command."""

import sys

from qdelta.cli import main

sys.exit(main())
