"""The five seed architectures compile for x86 and arm64, and both match torch.

x86 runs here; arm64 is cross-compiled and run on the emulated board over RPC (correctness only).
Inputs are 64x64 to keep CI short (VGG-16 needs 224x224: its adaptive pool must tile exactly).
Weights are the zoo's fixed random ones: these are numerical checks, not accuracy claims.

Tolerance (fp32): max|y - y_torch| / max|y_torch| <= 1e-4; reduction order differs from torch's,
so error grows with depth.
"""

import numpy as np
import pytest
import torch

from qcompile.backends.tvm.backend import TvmBackend
from qcompile.frontends.torch_frontend import load_torch
from qcompile.models.zoo import SEED_MODELS
from qcompile.passes import PassManager, parse_pipeline
from qcompile.passes.manager import max_rel_error

MODEL_REL = 1e-4
SIZES = {"vgg16": 224}


@pytest.fixture(scope="module", params=sorted(SEED_MODELS))
def seed(request):
    name = request.param
    size = SIZES.get(name, 64)
    m = SEED_MODELS[name](size)
    g = PassManager(parse_pipeline("fold-bn,dead-code")).run(load_torch(m, m.example_inputs, ["input"]))
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    return name, g, {"input": x}, ref


def test_seed_model_on_x86_matches_torch(seed):
    name, g, feed, ref = seed
    err = max_rel_error(TvmBackend("x86").runner(g).run(feed), [ref])
    assert err <= MODEL_REL, f"{name}: relative error {err:.2e}"


def test_seed_model_on_arm64_board_matches_torch(seed, arm_board):
    name, g, feed, ref = seed
    err = max_rel_error(TvmBackend("arm64").runner(g).run(feed), [ref])
    assert err <= MODEL_REL, f"{name}: relative error {err:.2e}"
