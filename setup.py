from setuptools import find_packages, setup

# `kernels/` and `configs/` are top-level folders of the repository but install as the subpackages
# `stop_fast.kernels` and `stop_fast.configs`: a top-level module named `kernels` would clash with an
# unrelated package, and `--config hmdb51` finds the installed file by name.
setup(
    name="stop_fast",
    version="0.2.0",
    description="STOP (spatial-temporal dynamic prompting) for CLIP video models, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # configs are read with tomllib
    packages=find_packages(include=["stop_fast", "stop_fast.*"]) + ["stop_fast.kernels", "stop_fast.configs"],
    package_data={"stop_fast": ["model_configs/*.json"], "stop_fast.configs": ["*.toml"]},
    package_dir={"stop_fast.kernels": "kernels", "stop_fast.configs": "configs"},
    install_requires=[
        "torch>=2.5",
        "open_clip_torch>=2.24",
        "safetensors",
        "tqdm",
        "numpy",
        # PyAV reads video files: the first command a user runs must be able to. The reader converts
        # frames with its own single-threaded scaler, so workers forked after a decode do not hang on
        # av 19's shared scaler pool (tests/test_data_fork.py); 14..19 are the releases tested.
        "av>=14,<20",
        # every training run (and the demo, the README's first command) plots its curves; `visualize`
        "matplotlib",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130; platform_system == 'Linux'"],  # GPU (NVDEC) decoding
        "tensorboard": ["tensorboard"],  # optional training logs
        "test": ["pytest", "pytest-benchmark", "tensorboard", "nvidia-dali-cuda130; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["stop-fast=stop_fast.cli:main"]},
)
