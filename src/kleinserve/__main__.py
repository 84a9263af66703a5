"""``python -m kleinserve``: the same as the ``kleinserve`` command."""

from kleinserve.cli import main

main()
