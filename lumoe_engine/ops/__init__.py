"""Public ops: validated front functions that dispatch to the backend chosen once (see ``dispatch``).

Model code calls these (or the autograd Function in ``autograd``), never a kernel.
"""
from lumoe_engine.ops.dispatch import backend_name, reset_backend  # noqa: F401
from lumoe_engine.ops.meta import RoutingMeta, padded_length  # noqa: F401
from lumoe_engine.ops.routing import align_by_expert, build_routing, topk_routing  # noqa: F401
from lumoe_engine.ops.lora import lora_expand, lora_shrink, lora_shrink_expand, lora_weight_grad  # noqa: F401
from lumoe_engine.ops.autograd import GroupedLoRAFunction, grouped_lora, single_expert_lora  # noqa: F401
