"""The Triton backend: the launchers of ``lumoe_engine.kernels``, one kernel per file."""
from lumoe_engine.kernels.topk_routing import topk_routing  # noqa: F401
from lumoe_engine.kernels.align_by_expert import align_by_expert  # noqa: F401
from lumoe_engine.kernels.lora_shrink import lora_shrink  # noqa: F401
from lumoe_engine.kernels.lora_expand import lora_expand  # noqa: F401
from lumoe_engine.kernels.lora_shrink_expand import lora_shrink_expand  # noqa: F401
from lumoe_engine.kernels.lora_grad import lora_weight_grad  # noqa: F401
