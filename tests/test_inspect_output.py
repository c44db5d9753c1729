"""`inspect` names the dtypes of the weights it did not find in FP8, and only dtypes the checkpoint holds (it printed
"BF16 2-D weights 66" beside a dtype row with no bfloat16 in it)."""

from __future__ import annotations

import re

from fp8cookbook.checkpoint import inspect_checkpoint
from fp8cookbook.convert import base_from_quantize_report, convert_checkpoint


def test_unquantized_weights_line_matches_the_dtypes_row(handmade, tmp_path):
    out = tmp_path / "fp8"
    convert_checkpoint(handmade["export"], out, state_file=handmade["state"], base_transformer=handmade["base"],
                       progress=False)
    lines = inspect_checkpoint(out).lines()
    dtypes = dict(re.findall(r"(\w+): (\d+)", next(line for line in lines if line.startswith("dtypes"))))
    row = next(line for line in lines if "2-D weights" in line or line.startswith("non-FP8 weights"))
    assert not row.startswith("BF16"), row
    named = dict(re.findall(r"(\w+): (\d+)", row))
    assert named and set(named) <= set(dtypes), (row, dtypes)
    assert all(int(n) <= int(dtypes[d]) for d, n in named.items()), (row, dtypes)
    assert sum(int(n) for n in named.values()) == int(re.search(r"weights\s+(\d+)", row).group(1))


def test_convert_finds_the_base_transformer_in_quantize_json(tmp_path):
    (tmp_path / "export" / "transformer").mkdir(parents=True)
    (tmp_path / "quantize.json").write_text('{"paths": {"transformer": {"base": "/models/base/transformer", '
                                            '"export": "export/transformer", "fp8": "fp8/transformer"}}}')
    assert str(base_from_quantize_report(tmp_path / "export" / "transformer")) == "/models/base/transformer"
    assert base_from_quantize_report(tmp_path / "elsewhere") is None
