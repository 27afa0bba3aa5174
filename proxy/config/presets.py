"""Provider presets: policy files shipped inside the package, used by name (``preset: stripe``).

Why in the package: ``pip install`` users get them with the code. The repository's
``policies/presets`` is a symlink to the same folder, so every preset has one home. A preset is
an ordinary policy file (``hosts`` and settings, no secrets); the loader merges a policy over it
with the same deep merge that puts a policy over ``defaults``.
"""

from __future__ import annotations

from pathlib import Path

PRESET_KEY = "preset"
"""The policy key that names a preset."""

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def names() -> tuple[str, ...]:
    """Every shipped preset, sorted (``stripe`` for ``presets/stripe.yaml``)."""
    return tuple(sorted(file.stem for file in PRESET_DIR.glob("*.yaml")))


def path_of(name: str) -> Path | None:
    """The preset's file, or None when no preset has that name."""
    return PRESET_DIR / f"{name}.yaml" if name in names() else None
