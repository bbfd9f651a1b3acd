"""A row's edit carrying its own vector (VectorEdit, what a served request's rows carry): its
term is coefficient x vector in float32, beside table edits of other rows, computed here in
plain numpy."""

from __future__ import annotations

import numpy as np
import torch

from actors.steering import RowEdit, VectorEdit, edit_terms


def test_vector_edits_add_their_own_vector_beside_table_edits():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((2, 8)).astype(np.float32)
    v, w = rng.standard_normal((2, 8)).astype(np.float32)
    rows = [
        (RowEdit(1, 3, "resid_pre", coefficient=0.5),),
        (VectorEdit(v, 3, "resid_pre", coefficient=-2.0), VectorEdit(w, 3, "resid_pre", coefficient=1.5)),
        (),
        (VectorEdit(v, 1, "mlp_in", coefficient=4.0),),  # another hook: not in this term
    ]
    terms = edit_terms(rows, torch.tensor(table), [(3, "resid_pre")])
    [(positions, per_row)] = terms[(3, "resid_pre")]
    expected = np.zeros((4, 8), np.float32)
    expected[0] = np.float32(0.5) * table[1]
    expected[1] = np.float32(-2.0) * v + np.float32(1.5) * w
    assert positions == "all"
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=0, atol=1e-6)
    assert set(terms) == {(3, "resid_pre")}
