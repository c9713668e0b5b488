"""``python -m x2recon.cli``: the same as the ``x2recon`` command."""

import sys

from . import main

sys.exit(main())
