"""The registered deterministic methods, one module per family (`bounds`, `lipschitz`, `solvers`,
`bab`); `verify.registry.METHOD_MODULES` imports them. Top layer of `relax`: nothing in `relax`
imports these modules.
"""
