"""`flowrunner batch`: one flow over many inputs (items.py reads them, results.py records them,
run.py runs them, progress.py reports, command.py ties it to the command line)."""
