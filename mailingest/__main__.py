"""C{python -m mailingest}: the admin command, for when the console script is not on PATH."""

import sys

from mailingest.app.cli import main

sys.exit(main())
