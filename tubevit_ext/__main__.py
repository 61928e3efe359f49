"""``python -m tubevit_ext train|eval|predict ...``: see tubevit_ext/cli.py."""
from .cli import main

main()
