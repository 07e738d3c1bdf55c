"""lumoe-engine: lifelong unlearning of multimodal LLMs — a frozen base, one LoRA expert per removal request, a gate."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import that the optional Hugging Face ``kernels`` package is absent, and falls
# back to its own NF4 path; that fallback is what this engine uses on CPU, so the warning is noise here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
