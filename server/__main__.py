"""``python -m server``: the same as ``herald serve``."""

import sys

from herald.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
