"""``python -m mptls``: the same as the ``mptls`` command."""

import sys

from mptls.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
