"""SAMCL: continual learning for Segment Anything with AugModules and a Module Selector."""
__version__ = "0.4.0"  # the one version string: pyproject.toml reads it
