"""Installs vimrag_jax: VimRAG (memory graph + GGPO) training in JAX."""

from setuptools import find_packages, setup

# Tested ranges: the lower bounds are the set CI tests (pinned exactly in constraints.txt,
# which scripts/venv.sh installs with); the upper bounds admit the next minor releases an
# accelerator image may ship (e.g. Python 3.12 with jax 0.11 and its CUDA 13 plugin).
JAX = "jax>=0.10.2,<0.12"
INSTALL_REQUIRES = [
    JAX,
    "jaxlib>=0.10.2,<0.12",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.14",
    "chex>=0.1.92,<0.2",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",
    "ml-collections>=1.1.0,<2",
    "transformers>=5.23.0,<6",
    "tokenizers>=0.23.3,<1",
    "safetensors>=0.8.0,<1",
    "msgpack>=1.2.4,<2",
    "ml-dtypes>=0.6.0,<1",
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "pillow>=13.0.0,<14",
    # PDF pages of the benchmark corpus (vimrag_jax.benchmarks.media renders them).
    "pypdfium2>=5.15.2,<6",
    # TensorBoard event files (its writer needs no TensorFlow) and the plots of plot.py.
    "tensorboard>=2.21.0,<3",
    "matplotlib>=3.11.2,<4",
]

# The accelerator plugins, by the jax extra that brings each (`pip install -e .[cuda13]`).
ACCELERATORS = {
    "cuda12": [JAX.replace("jax", "jax[cuda12]", 1)],
    "cuda13": [JAX.replace("jax", "jax[cuda13]", 1)],
    "tpu": [JAX.replace("jax", "jax[tpu]", 1)],
}

TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "hypothesis==6.170.15",
    # CPU-only PyTorch is the parity oracle for the model ports; never torchvision
    # (its only build breaks the Qwen3-VL import in transformers).
    "torch==2.13.0",
    "ruff==0.17.5",
]

setup(
    name="vimrag_jax",
    version="0.1.0",
    description="VimRAG: multimodal memory graph RAG trained with GGPO, in JAX",
    packages=find_packages(include=["vimrag_jax", "vimrag_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, **ACCELERATORS},
)
