"""The ``paramarket`` command and multi-process supervision."""
