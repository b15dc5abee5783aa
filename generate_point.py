#!/usr/bin/env python
"""Write or check the static prompt points (python generate_point.py --help); the code is samcl.scripts, as for
the console script samcl-points."""
from samcl.scripts import points

if __name__ == "__main__":
    points()
