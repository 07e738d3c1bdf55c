"""Faults injected into expert training by the stream and store tests."""
import torch

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


def blown_up_for(request_id, factor=300.0):
    """train_expert, but the expert of ``request_id`` comes back with its B matrices scaled by ``factor``: a
    collapsed expert (finite loss, babbling answers)."""
    def wrapped(model, processor, ctx, request, *args, **kw):
        expert, stats = real_train_expert(model, processor, ctx, request, *args, **kw)
        if request.id == request_id:
            g = torch.Generator().manual_seed(0)
            expert.weights = {m: (a, factor * torch.randn(b.shape, generator=g) / b.shape[1] ** 0.5)
                              for m, (a, b) in expert.weights.items()}
        return expert, stats
    return wrapped
