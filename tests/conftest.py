"""Shared fixtures. Third-party models are fetched once into the cache folder."""

import pytest


@pytest.fixture(scope="session")
def rapidocr_models():
    from qcompile.models.thirdparty import RegistryUnavailable, fetch_rapidocr_models

    try:
        return fetch_rapidocr_models()
    except RegistryUnavailable as e:
        pytest.skip(f"PyPI registry unreachable, third-party model not available: {e}")
