"""``python -m sezm``: the ``sezm`` command line."""

from .cli import console

console()
