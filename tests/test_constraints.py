"""requirements.txt (direct pins) and constraints.txt (every transitive pin) agree."""

import re

from kalm_lib.layout import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)")


def pins(name: str) -> dict[str, str]:
    """Package -> pinned version of a pip requirements file (names normalised as pip does)."""
    found = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def test_every_direct_pin_is_in_the_constraints_with_the_same_version():
    direct, constraints = pins("requirements.txt"), pins("constraints.txt")
    missing = sorted(set(direct) - set(constraints) - {"torch"})
    differ = {name: (version, constraints[name]) for name, version in direct.items()
              if name in constraints and constraints[name] != version}
    assert not missing, f"constraints.txt lacks {missing}: regenerate it with pip freeze --exclude-editable"
    assert not differ, f"requirements.txt and constraints.txt pin different versions: {differ}"
    assert "torch" not in constraints, "torch is pinned in requirements.txt only (GPU hosts install their CUDA build)"
