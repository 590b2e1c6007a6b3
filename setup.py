"""tttjax: test-time-training layers and long-video diffusion transformers in JAX."""

from setuptools import find_packages, setup

setup(
    name="tttjax",
    version="0.1.0",
    description=(
        "JAX/Flax NNX framework for long video Diffusion Transformers with "
        "test-time-training (TTT) layers"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tttjax", "tttjax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "einops",
        "safetensors",
        "tensorflow-datasets>=4.9.9",
        "importlib_resources",  # tfds needs it to build datasets without TensorFlow
        "grain>=0.2.12",
        "array_record",
        "imageio",
        "imageio-ffmpeg",
        "mediapy",
        "matplotlib",
        "tqdm",
        "tensorboardX",
        "pillow",
        "sentencepiece",  # the T5 tokenizer (tttjax.text)
    ],
    extras_require={
        # The TPU runtime and compiler (libtpu pinned by jax to its own version). Also what
        # `python -m tttjax.bench aot --topology v5p-256` needs to compile for a TPU slice on
        # any host, a CPU-only one included.
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        # Parity tests against the reference implementations (CPU torch only).
        "test": [
            "pytest",
            "pytest-timeout",
            "torch==2.13.0",
            "diffusers",
            "transformers",
            "sentencepiece",
            "nbclient",
            "nbformat",
            "ipykernel",
            "jax[tpu]",  # libtpu: the tests compile train steps and Pallas kernels for TPUs
        ],
    },
)
