"""Quantization math shared by the quantization passes (issue #5): scales, observers, int4 packing.

Only the numerics live here (numpy, no graph); the passes that rewrite the IR build on it.
"""
