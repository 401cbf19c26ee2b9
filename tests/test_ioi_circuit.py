"""The IOI circuit front end: roles from patching parts by the stated criteria, the table, resuming by parts."""

import json
import math

import pytest

from sae_lens_attn.frontends.ioi_circuit import (
    THRESHOLD,
    CircuitConfig,
    assign_roles,
    name_movers,
    role_table,
    run,
)

NAN = math.nan


def _grid(values: dict, fill=0.0):
    g = [[fill] * 3 for _ in range(4)]
    for (L, h), v in values.items():
        g[L][h] = v
    return g


def _parts():
    return {
        "all": {"effect": _grid({(0, 1): -0.2, (1, 0): -0.3, (2, 2): -0.1, (3, 0): -0.5, (3, 1): 0.2, (0, 2): -0.06})},
        "end": {"effect": _grid({(3, 0): -0.4, (3, 1): 0.15, (3, 2): -0.2})},
        "s2": {"effect": _grid({(0, 1): -0.1, (1, 0): -0.08})},
        "scores": {"dla": _grid({(3, 0): 1.2, (3, 1): -0.5, (3, 2): 0.3}),
                   "end_to_io": _grid({(3, 0): 0.6, (3, 2): 0.1}), "end_to_s2": _grid({(3, 0): 0.1, (3, 2): 0.5}),
                   "s2_to_s1": _grid({(0, 1): 0.7, (1, 0): 0.1}), "s2_to_s1_next": _grid({(0, 1): 0.1, (1, 0): 0.6})},
        "path": {"effect": _grid({(2, 2): -0.07, (1, 0): -0.01}, NAN)},
        "path_k": {"effect": _grid({(0, 2): -0.06}, NAN)},
    }


def test_roles_follow_the_stated_criteria():
    parts = _parts()
    assert name_movers(parts) == [(3, 0)]  # (3, 2) writes the answer but attends to S2 more than to IO
    roles = assign_roles(parts)
    assert roles == {"3.0": "name mover", "3.1": "negative name mover", "2.2": "S-inhibition",
                     "0.1": "duplicate-token", "1.0": "induction", "0.2": "key-side S-inhibition"}
    assert THRESHOLD == 0.05  # fixed before the SmolLM2 run; changing it changes the committed roles
    table = role_table(parts)
    assert "| L3H0 | name mover | -0.500 | -0.400 |" in table and "| L0H2 | key-side S-inhibition |" in table


def test_parts_resume_and_other_settings_are_refused(tmp_path):
    cfg = CircuitConfig(model=None, prompts=4)
    (tmp_path / "circuit.json").write_text(json.dumps({"settings": {**cfg.__dict__, "prompts": 8}, "parts": {}}))
    with pytest.raises(ValueError, match="other settings"):
        run(cfg, tmp_path)
