"""Shared engine-test pieces: a bank of random experts for a micro model."""
from lumoe_engine.model import multilora as ml
from lumoe_engine.model.bank import ExpertBank


def random_bank(model, expert_ids, layers=(1,), rank=2) -> ExpertBank:
    """An in-memory bank with one random expert (seeded by its id's length) per id, on every target linear of
    ``layers``."""
    bank = ExpertBank(None)
    shapes = ml.module_shapes(model, ml.target_module_names(model, layers=list(layers)))
    for eid in expert_ids:
        bank.add(ml.random_expert(eid, shapes, rank=rank, seed=len(eid)))
    return bank
