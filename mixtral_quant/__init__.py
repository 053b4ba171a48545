"""mixtral-quant: quantize and export Mixtral-8x7B (and Mistral-7B), experts included."""

__version__ = "0.1.0"
