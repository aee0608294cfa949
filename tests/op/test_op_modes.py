"""One statement of the modes: the Python enum, the C++ header and the op's ids agree."""
import re
from pathlib import Path

import pytest

import fire_kernels
import fire_repair as fr
from fire_kernels import Mode
from fire_repair.ops import MODE_IDS

ROOT = Path(__file__).resolve().parents[2]


def test_python_enum_matches_the_cpp_header():
    header = (ROOT / "csrc/repair.h").read_text()
    enum = re.search(r"enum Mode : int64_t \{([^}]*)\}", header).group(1)
    values = {name.strip()[1:].upper(): int(v) for name, v in (item.split("=") for item in enum.split(","))}
    assert values == {m.name: int(m) for m in Mode}


def test_modes_names_and_ids():
    assert fr.MODES == fire_kernels.MODES == ("shift", "project", "clamp", "gated", "invert")
    assert MODE_IDS == {"shift": 0, "project": 1, "clamp": 2, "gated": 3, "invert": 4}
    assert (fire_kernels.SHIFT, fire_kernels.PROJECT, fire_kernels.CLAMP, fire_kernels.GATED,
            fire_kernels.INVERT) == tuple(Mode)
    assert Mode.parse("clamp") is Mode.CLAMP
    for bad in ("CLAMP", "clip", "", None, 2):
        with pytest.raises(ValueError, match="mode must be one of"):
            Mode.parse(bad)
