"""The torch reference backend: same signatures as the Triton launchers; the CPU path and the test oracle."""
from lumoe_engine.ops.ref_routing import align_by_expert, topk_routing  # noqa: F401
from lumoe_engine.ops.ref_lora import lora_expand, lora_shrink, lora_shrink_expand, lora_weight_grad  # noqa: F401
