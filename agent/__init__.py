"""edgefleet device agent.

Installed on every board. Importing this package must stay cheap: no onnx, no
server code, no inference runtime until a model is actually loaded.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
