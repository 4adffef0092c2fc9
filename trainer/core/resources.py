"""Files that ship with Stepwise (configs/, eval_prompts/), found from a source checkout or an install.

In a checkout (or an editable install) they are the repository's own top-level folders; a wheel
carries copies under trainer/_data/ (pyproject.toml maps them there), so `pip install .` works from
any folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE_DATA = ("configs", "eval_prompts")


def data_path(relative: str) -> Path:
    """configs/demo.yaml, eval_prompts/demo_ifeval.jsonl, ...: the installed copy, else the checkout's."""
    top = relative.split("/", 1)[0]
    if top not in PACKAGE_DATA:
        raise ValueError(f"{relative}: not a packaged data folder ({', '.join(PACKAGE_DATA)})")
    installed = Path(str(resources.files("trainer"))) / "_data" / relative
    if installed.exists():
        return installed
    return Path(__file__).resolve().parents[2] / relative


def user_or_packaged(path: str | Path) -> Path:
    """A path as given when it exists; a packaged default (eval_prompts/...) from anywhere otherwise."""
    p = Path(path)
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] not in PACKAGE_DATA:
        return p
    packaged = data_path(p.as_posix())
    return packaged if packaged.exists() else p
