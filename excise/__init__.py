"""excise: attribute, scope, forget, and prove it.

The front door of the project: the command line (:mod:`excise.cli`), reading the user's
files (:mod:`excise.records`, :mod:`excise.models`) and the embedded default world
(:mod:`excise.world`).
The libraries it drives are :mod:`attribution`, :mod:`unlearn` and :mod:`analysis`.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # as attribution.artifacts.package_version, without importing torch for --version
    __version__ = version("excise")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
