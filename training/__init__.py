"""Build, train, evaluate and export the MD-CSDNetwork the worker runs."""
