"""``python -m policycascade.compare``."""

import sys

from policycascade.compare.cli import main

sys.exit(main())
