"""``python -m worker``: the same as ``herald worker``."""

import sys

from herald.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
