"""Repository-level pytest settings: modules that must not be imported by doctest."""

collect_ignore = ["excise/__main__.py"]
