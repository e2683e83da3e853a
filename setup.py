from setuptools import setup

setup(
    name="tokaccel",
    version="0.1.0",
    description="Token-level KV selection, eviction and speculative decoding for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "tokaccel",
        "tokaccel.policies",
        "tokaccel.evals",
        "tokaccel.bench",
        "tokaccel.kernels",
    ],
    package_dir={"tokaccel.kernels": "kernels"},
    package_data={"tokaccel.evals": ["data/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.2,<6",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "safetensors",
        # GGUF loading of the embedded models (transformers requires both to read a GGUF file)
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        "eval": ["matplotlib>=3.7"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["tokaccel = tokaccel.cli:main"]},
)
