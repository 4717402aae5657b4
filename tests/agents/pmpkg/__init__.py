"""A package whose module runs as a python-module entry ("pmpkg.app")."""
