"""The command line: Typer commands that parse and print, and their rich rendering."""
