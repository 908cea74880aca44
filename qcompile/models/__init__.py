"""Bundled and third-party models."""
