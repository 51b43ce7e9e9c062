"""Per-model calibration data (QCFuse's critical layers, ratio auto's attention shares), read at load time.

Kept apart from the commands that measure it (`qcfuse profile`, `qcfuse calibrate` in profile.py), so loading a
model never imports the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

PROFILE_FILE = "qcfuse-profile.json"
PACKAGED = Path(__file__).resolve().parents[1] / "profiles"


def load_profile(model_dir: Path | None, alias: str | None) -> dict | None:
    """The profile shipped for a built-in alias, updated by what is stored with the model (a user's own
    `qcfuse profile` or `qcfuse calibrate` run): later measurements win, key by key."""
    profile: dict = {}
    for path in ([PACKAGED / f"{alias}.json"] if alias else []) + ([model_dir / PROFILE_FILE] if model_dir else []):
        if path.is_file():
            profile.update(json.loads(path.read_text()))
    return profile or None


def update_profile(path: Path, updates: dict) -> dict:
    """Merge `updates` into the profile at `path` (created if missing), keeping every other key; a table
    (e.g. ratio auto's, per method) is merged one level down, so recalibrating one method keeps the others."""
    path = Path(path)
    profile = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in updates.items():
        old = profile.get(key)
        profile[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return profile
