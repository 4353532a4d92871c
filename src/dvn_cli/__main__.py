"""``python -m dvn_cli`` runs the ``dvn`` command line."""

from .cli.app import app

if __name__ == "__main__":
    app()
