"""Every method into every layout writes the tensors it wrote before the house was rebuilt, byte for byte
(see golden_layouts.py for the cases and how the reference was recorded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from golden_layouts import CASES, GOLDEN, PORTABLE_ENV


def test_every_method_and_layout_writes_the_recorded_bytes(tmp_path: Path) -> None:
    script = Path(__file__).with_name("golden_layouts.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, **PORTABLE_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(proc.stdout)
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES)
    changed = {case: min((_differences(recorded, written[case]) for recorded in _alternatives(golden[case])), key=len)
               for case in golden}
    assert not any(changed.values()), {case: names for case, names in changed.items() if names}


def _alternatives(recorded: dict | list) -> list[dict]:
    """A case's recorded digests: one set, or one per CPU vendor where the portable mode still differs."""
    return recorded if isinstance(recorded, list) else [recorded]


def _differences(recorded: dict[str, str], written: dict[str, str]) -> list[str]:
    """Tensor names stored by one side only, else those whose bytes differ."""
    return sorted(set(recorded) ^ set(written)) or [name for name in recorded if recorded[name] != written[name]]
