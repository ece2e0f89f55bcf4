"""`python -m healthspace` is the `healthspace` command."""

from healthspace.cli.main import app

app()
