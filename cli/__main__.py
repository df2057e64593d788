"""``python -m lomix.cli`` runs the ``lomix`` command (``accelerate launch -m lomix.cli ...`` too)."""

from .app import main

main()
