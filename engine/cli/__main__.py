"""``python -m engine.cli``: the same as the ``credential-engine`` console script."""

import sys

from engine.cli import main

sys.exit(main())
