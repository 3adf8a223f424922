"""``python -m policycascade <command>``: the same as the ``policycascade`` console script."""

from policycascade.cli import run

run()
