"""Developer scripts (not installed with the package): python scripts/<name>.py --help."""
