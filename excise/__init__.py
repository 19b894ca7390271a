"""excise: attribute, scope, forget, and prove it.

The front door of the project: the command line (:mod:`excise.cli`), reading the user's
files (:mod:`excise.records`, :mod:`excise.models`) and the embedded default world
(:mod:`excise.world`).
The libraries it drives are :mod:`attribution`, :mod:`unlearn` and :mod:`analysis`.
"""

from attribution.artifacts import package_version

__version__ = package_version()

__all__ = ["__version__"]
