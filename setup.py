"""lumoe-engine: lifelong unlearning of multimodal LLMs with one LoRA expert per request.

The top-level ``kernels/`` folder installs as ``lumoe_engine.kernels`` (never as a bare ``kernels`` module: that
name belongs to the Hugging Face package transformers probes for). The C++ CPU op in ``csrc/`` is compiled on first
use by ``torch.utils.cpp_extension``; the engine works without a compiler (torch reference fallback).
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="lumoe-engine",
    version="0.1.0",
    description="Lifelong unlearning engine for multimodal LLMs: one LoRA expert per removal request, a gate, "
    "Triton routing and grouped multi-LoRA kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "lumoe_engine",
        "lumoe_engine.kernels",
        "lumoe_engine.csrc",
        "lumoe_engine.ops",
        "lumoe_engine.model",
        "lumoe_engine.gate",
        "lumoe_engine.unlearn",
        "lumoe_engine.data",
        "lumoe_engine.eval",
        "lumoe_engine.stream",
    ],
    package_dir={"lumoe_engine.kernels": "kernels", "lumoe_engine.csrc": "csrc"},
    package_data={"lumoe_engine.csrc": ["*.cpp", "*.h"], "lumoe_engine.stream": ["hyperparameters.json"]},
    install_requires=_requirements(),
    entry_points={"console_scripts": ["lumoe=lumoe_engine.run:main"]},
)
