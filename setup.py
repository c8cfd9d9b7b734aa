"""Packaging for okdfast.

``kernels/`` holds the Triton kernels; it is installed as ``okdfast.kernels`` (a top-level ``kernels`` package
would clash with an unrelated PyPI project of that name).

``install_requires`` states the supported range (okdfast/compat.py handles what differs inside it: torch 2.11 with
triton 3.6 up to torch 2.14 with triton 3.8); ``constraints.txt`` pins the exact versions CI installs and tests.
"""

from setuptools import find_packages, setup

_okdfast_packages = find_packages(include=["okdfast", "okdfast.*"])

setup(
    name="okdfast",
    version="0.1.0",
    description="Online knowledge distillation via multi-branch diversity enhancement (ACCV 2020), fast.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_okdfast_packages + ["okdfast.kernels"],
    package_dir={"okdfast.kernels": "kernels"},
    package_data={"okdfast": ["paper_tables.yaml"], "okdfast.ops": ["fused_verdicts.json"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "triton>=3.6,<3.9",
        "numpy>=1.26",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        # DALI runs CPU-only pipelines without a GPU (device_id=None).
        "dali": ["nvidia-dali-cuda130"],
        # FFCV compiles against system libraries: apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config
        "ffcv": ["ffcv", "numba", "opencv-python-headless"],
        "tensorboard": ["tensorboard"],
        "dev": ["pytest", "pytest-timeout", "ruff", "tensorboard"],
    },
    entry_points={"console_scripts": ["okdfast-train=okdfast.train:main"]},
)
