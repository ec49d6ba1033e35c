"""deepseek-jax: DeepSeek-V3-class models (MLA, DeepSeekMoE, MTP) in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="deepseek-jax",
    version="0.1.0",
    description="Train, evaluate and sample DeepSeek-V3-class models in JAX/Flax on CPU, GPU or TPU.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["models*", "configs*", "tools*", "data*", "training*", "sharding*",
                                    "inference*", "evaluation*"]),
    py_modules=["train", "eval"],
    install_requires=[
        "jax>=0.11",
        "flax>=0.12.10",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "ml-dtypes>=0.5",
        "numpy>=1.26",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",  # builders only; no TensorFlow needed (array_record + data_source)
        "array-record>=0.8",
        "importlib_resources",  # tfds imports it for package-local builders
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "jinja2>=3.1",  # HF chat templates (supervised fine-tuning data)
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "filelock>=3.12"],
        # The GPU grouped matmul ("pallas") needs only jax; tokamax serves grouped_matmul="tokamax"
        # (imported lazily; tokamax 0.0.17 also imports xprof).
        "gpu": ["jax[cuda12]", "tokamax>=0.0.17"],
    },
)
