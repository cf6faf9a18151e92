"""``python -m launcher``: the ``imagecache`` command."""

import sys

from launcher.cli import main

sys.exit(main())
