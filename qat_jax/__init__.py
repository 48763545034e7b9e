"""qat_jax: compute-optimal quantization-aware training of Llama-style language models."""

__version__ = "0.1.0"
