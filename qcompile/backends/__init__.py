"""Backends: torch (reference), onnxruntime; TVM next. See base.py for the contract."""
