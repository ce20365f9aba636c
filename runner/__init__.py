"""rode: residual networks as discretized Neural ODEs.

The public surface is the residual stack; everything else is the command-line
runner built on it.
"""
from .gradmodes import GRAD_MODES, Adjoint, Backprop
from .integrators import INTEGRATORS
from .stack import ResidualStack

__all__ = ["ResidualStack", "INTEGRATORS", "GRAD_MODES", "Adjoint", "Backprop"]
__version__ = "0.1.0"
