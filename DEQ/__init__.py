"""Deep equilibrium models: MDEQ for classification, fixed-point solvers, training."""

__version__ = "0.1.0"
