"""``python -m xailab``: the command line, also the module torchrun starts (``torchrun ... -m xailab train``)."""

import sys

from xailab.cli import main

if __name__ == "__main__":
    sys.exit(main())
