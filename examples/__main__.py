"""``python -m examples demo | serve | poke``: the ``intercept-dispatch`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
