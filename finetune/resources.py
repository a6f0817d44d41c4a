"""Files shipped with finetune (the dataset registry and its demo data, the eval suites): where they
are in a source checkout and in an installed wheel. Imports nothing of ours, so config may use it."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# finetune/shipped/{data,eval} are links to the checkout's data/ and eval/; a wheel holds copies
# (package data, pyproject.toml), so one lookup works in a checkout, an editable and a plain install.
INSTALLED = PACKAGE / "shipped"
CHECKOUT = PACKAGE.parent  # where the links point (a checkout whose links were not kept)


def shipped(relative: str) -> Path | None:
    """`data/datasets.yaml`, `eval/suites/general.yaml`, ... as shipped, or None."""
    for root in (INSTALLED, CHECKOUT):
        if (root / relative).exists():
            return root / relative
    return None


def find_suite(name: str) -> str:
    """A suite path as given, else one shipped with finetune (`eval/suites/general.yaml`)."""
    if Path(name).is_file():
        return name
    found = shipped(name)
    return str(found) if found is not None and found.is_file() else name
