"""``python -m worker``: the same as ``herald worker``."""

import sys

from worker.app import main

sys.exit(main(sys.argv[1:]))
