"""``python -m server``: the same as ``herald serve``."""

import sys

from server.runner import main

sys.exit(main(sys.argv[1:]))
