"""Faults injected into expert training by the stream and store tests."""
from lumoe_engine.unlearn.trainer import train_expert as real_train_expert


def nan_for(request_id):
    """train_expert, but the request ``request_id`` runs on a base whose logits are nan (a diverging loss)."""
    def wrapped(model, processor, ctx, request, *args, **kw):
        if request.id != request_id:
            return real_train_expert(model, processor, ctx, request, *args, **kw)
        handle = model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
        try:
            return real_train_expert(model, processor, ctx, request, *args, **kw)
        finally:
            handle.remove()
    return wrapped
