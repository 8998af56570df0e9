"""Solver-based relaxations and exact verification of ReLU networks on the dense view: the triangle
LP (`lp`), the MILP (`milp`, also minimum distortion) and the SDP (`sdp`).
"""
