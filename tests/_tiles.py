"""Test helper: run the grouped GEMMs with the tiles of larger batches at any size."""

import importlib

from moetron.ops._launch import LaunchPlans

_gmm = importlib.import_module("moetron.ops.gmm")


def standard_tiles(monkeypatch):
    """Turn the decode tiles (gmm._FEW_ROWS_PER_GROUP) off for this test, with launch plans of its own: a plan
    cached by an earlier call of the same shape would replay the decode tiles."""
    monkeypatch.setattr(_gmm, "_FEW_ROWS_PER_GROUP", 0)
    for plans in ("_FWD_PLANS", "_GATED_PLANS", "_WGRAD_PLANS"):
        monkeypatch.setattr(_gmm, plans, LaunchPlans())
