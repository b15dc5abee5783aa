"""SAMCL: continual learning for Segment Anything with AugModules and a Module Selector."""
__version__ = "0.1.0"
