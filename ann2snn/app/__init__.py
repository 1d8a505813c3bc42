"""Front ends: the command line, its entry point, the Python API, and the pipeline they share."""
