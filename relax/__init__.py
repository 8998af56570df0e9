"""Deterministic bounds and relaxations of networks (no printing, no files, no CLI).

The public surface is :mod:`relax.bounds` (``bounds``, ``lower_bounds``, ``intermediate_bounds``,
``prepare``: bounds on ``C f(x) + d`` over an input set by interval / CROWN / DeepPoly /
alpha-CROWN) and :func:`relax.ir.graph.build_graph`; users reach the rest through the registered
methods of :mod:`relax.methods` (``verify.certify(..., method=...)``). The subpackages are layers,
lowest first: ``ir``, ``bounds`` and ``solvers``, ``exact`` and ``lipschitz``, ``bab``, ``methods``
(docs/ARCHITECTURE.md; the import rule is checked by tests/test_layers.py).
"""
