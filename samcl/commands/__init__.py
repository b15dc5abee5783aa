"""The commands behind the scripts: train (``train.py``, ``train_SAM2.py``, ``samcl-train``), test
(``test.py``, ``test_SAM2.py``, ``samcl-test``) and points (``generate_point.py``, ``samcl-points``).

Each parses its flags with :mod:`samcl.cli` before it imports torch or a backbone, then runs the
library (:mod:`samcl.pipeline`, :mod:`samcl.points`, :mod:`samcl.datacheck`).
"""
