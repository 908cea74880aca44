"""Low-rank factorization: the math and graph plumbing shared by the factorization passes.

* :mod:`.ranks` — rank candidates, energy-based rank choice, whole-model rank allocation under
  a MAC budget;
* :mod:`.layers` — which conv/linear nodes a pass may rewrite, their MACs, activation capture
  on calibration data, and the node-sequence rewrite with provenance;
* :mod:`.reconstruct` — data-driven reconstruction (Zhang et al. 2015): reduced-rank regression
  with asymmetric inputs and the nonlinear (ReLU) alternating solver.

The passes themselves live one per file in :mod:`qcompile.passes`.
"""
