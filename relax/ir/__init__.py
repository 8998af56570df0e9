"""The bound graph: a network as a DAG of bound nodes (`graph`), its op rules (`ops`), dead-ReLU
pruning for one input region (`prune`) and its dense affine view for the solver methods (`dense`).

Layer 1 of `relax` (see docs/ARCHITECTURE.md): imports nothing else from `relax`.
"""
