"""qcompile: compile trained CNNs into small, fast, verified factorized low-bit models."""

__version__ = "0.1.0"
