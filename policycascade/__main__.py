"""``python -m policycascade <command>``: the same as the ``policycascade`` console script."""

import sys

from policycascade.cli import main

sys.exit(main())
