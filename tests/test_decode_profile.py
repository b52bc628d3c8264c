"""benchmarks/decode_profile.py attributes every op of the decode loop to a part of the step
by the named scopes the model and the sampler put on their ops."""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_part_of_a_decode_step_is_found(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from decode_profile import category, profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = argparse.Namespace(hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, batch=2,
                              prompt_length=4, new_tokens=8, temperature=1.0, scan_layers=False)
    seconds = profile(args)
    for part in ("weight matmuls", "LM head", "attention", "cache writes", "norms, rotary",
                 "sampling"):
        assert seconds[part] > 0, part
    assert "| **decode step (ops timed)** |" in capsys.readouterr().out
    # The rules: a projection's dot is a weight matmul, not the MLP's elementwise work.
    assert category("jit(f)/while/body/mlp/bte,me->btm/dot_general", "ynn_fusion.3") == \
        "weight matmuls"
    assert category("jit(f)/while/body/mlp/mul", "multiply_fusion") == "MLP elementwise"
    assert category("jit(f)/while/body/lm_head/...e,ve->...v/dot_general", "f") == "LM head"
    assert category("jit(f)/while/body/add", "copy.3") == "copies"
