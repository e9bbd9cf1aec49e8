"""deepseek-operator's version (operator/ has no __init__.py, so no `operator` package can shadow the standard library)."""

__version__ = "0.1.0"
