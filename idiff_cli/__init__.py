"""idiff: Implicit Diffusion (Marion et al., AISTATS 2025) as a command-line experiment runner.

Importing the package does not import JAX, so that the CLI can configure the host platform
(number of CPU devices) before JAX starts.
"""

__version__ = "0.1.0"
