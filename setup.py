"""Installs vimrag_jax: VimRAG (memory graph + GGPO) training in JAX."""

from setuptools import find_packages, setup

# The stack this project is tested against (see docs and SPEC §9); pinned so a
# pod and a laptop build the same program.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "msgpack==1.2.4",
    "ml-dtypes==0.6.0",
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "pillow==13.0.0",
    # TensorBoard event files (its writer needs no TensorFlow) and the plots of plot.py.
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
]

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
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
