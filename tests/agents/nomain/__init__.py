"""A package with no __main__: not runnable as a python-module entry."""
