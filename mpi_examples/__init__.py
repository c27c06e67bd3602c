"""The training example (``mpi_examples/train.py``) and its small modules: ``data``,
``models``, ``methods``, ``cluster``, ``metrics``.  Not installed with the library; the
script puts the repository root on ``sys.path`` itself."""
