"""lumoe-engine: lifelong unlearning of multimodal LLMs — a frozen base, one LoRA expert per removal request, a gate."""

__version__ = "0.1.0"
