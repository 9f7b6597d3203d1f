"""The compression pipeline: per-profile variants of a model behind an accuracy gate.

``pipeline.build_profile`` plans the recipes a profile allows (``recipes``), produces each with
ONNX Runtime's quantizers (``onnx_tools``) or LiteRT Quantizer (``litert_tools``), measures its
fidelity against fp32 on evaluation data and its latency where this machine can stand in for the
device (``gate``, ``runners``), and picks what ships; ``codec`` chooses the artifact compression.
See docs/compression.md.
"""
