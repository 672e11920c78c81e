"""`Plan`: a budget per attention site, usually measured by ``dga-compile calibrate``.

A plan names attention sites by their position in model order (the HF layer index, as
`DGAConfig.dense_layers` does) and gives each either ``"dense"`` or overrides of the op's
parameters (`PLAN_FIELDS`: `config.OP_FIELDS` but ``impl``), e.g. ``{"focus_ratio": 0.2,
"window": 512}``. A site the plan does not name runs the config's own values.
``DGAConfig(plan=...)`` applies it: `DGAConfig.for_site` is what every entry point asks.

The file (JSON, written atomically, never pickled)::

    {"format": "dga-plan/1",
     "measured": {"model": ..., "text": ..., "seq_len": 2048, "windows": 2, "target": 0.02,
                  "increase": 0.018, "cost": 0.21, ...},
     "sites": {"0": {"focus_ratio": 0.2, "window": 512}, "7": "dense", "8": {}}}

``measured`` is what calibration measured (free-form; it does not change what a site runs).
Out of scope: entries per kv head (the op takes one config per call).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config import OP_FIELDS, DGAConfig

__all__ = ["DENSE", "FORMAT", "PLAN_FIELDS", "Plan"]

#: The format tag of a plan file.
FORMAT = "dga-plan/1"
#: The entry of a site kept dense.
DENSE = "dense"
#: The `DGAConfig` fields a site entry may set (the implementation is the config's business).
PLAN_FIELDS = tuple(f for f in OP_FIELDS if f != "impl")
_KEYS = ("format", "measured", "sites")

#: A normalised site entry: ``"dense"`` or sorted (field, value) pairs.
Entry = Union[str, tuple]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-site budgets: ``sites`` maps a site position (int ≥ 0) to ``"dense"`` or a mapping of
    `PLAN_FIELDS` to values (validated as `DGAConfig` validates them; stored as sorted tuples, so a
    plan is hashable). ``measured``: what calibration measured (a JSON-able mapping; stored as
    JSON text). ``source``: the file it came from ("" in memory); neither takes part in equality.
    """

    sites: Any
    measured: Any = dataclasses.field(default="{}", compare=False)
    source: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"plan {self.source}" if self.source else "plan"
        object.__setattr__(self, "sites", _normalise_sites(self.sites, where))
        measured = self.measured
        if isinstance(measured, str):
            measured = json.loads(measured)
        if not isinstance(measured, Mapping):
            raise ValueError(f"{where}: 'measured' must be a JSON object, got {measured!r}")
        try:
            text = json.dumps(dict(measured), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: 'measured' must hold JSON values (finite numbers, strings, lists, "
                             f"objects): {e}") from e
        object.__setattr__(self, "measured", text)

    @property
    def name(self) -> str:
        """The file name of `source`, or ``"plan"`` (what reports call the plan)."""
        return Path(self.source).name if self.source else "plan"

    @property
    def metadata(self) -> dict:
        """A fresh dict of what calibration measured."""
        return json.loads(self.measured)

    @property
    def dense_sites(self) -> tuple[int, ...]:
        """The sites the plan keeps dense, increasing."""
        return tuple(p for p, e in self.sites if e == DENSE)

    def entry(self, position: int) -> Optional[Entry]:
        """Site ``position``'s entry: ``"dense"``, its (field, value) pairs, or None when not named."""
        return dict(self.sites).get(position)

    def site_config(self, position: Optional[int], base: Optional[DGAConfig] = None) -> Optional[DGAConfig]:
        """What site ``position`` runs: None for dense, else ``base`` (default ``DGAConfig()``) with
        the site's overrides and no plan. An unknown position (None) or one not named: ``base``'s values."""
        base = DGAConfig() if base is None else base
        entry = None if position is None else self.entry(position)
        if entry == DENSE:
            return None
        return base.replace(plan=None, **dict(entry or ()))

    def to_json(self) -> dict:
        """The file's content as a dict (`save` writes it)."""
        return {"format": FORMAT, "measured": self.metadata,
                "sites": {str(p): e if e == DENSE else dict(e) for p, e in self.sites}}

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes the plan as JSON to ``path`` (atomically, with the mode of the file it replaces,
        else the umask's); returns the path."""
        from ._files import write_text

        return write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        """The plan a `save` file holds; every field is checked (`ValueError` naming the file, the
        site and the value)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read plan file {os.fspath(path)}: {getattr(e, 'strerror', None) or e}; "
                             f"write one with `dga-compile calibrate MODEL -o plan.json`") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan file {os.fspath(path)} is not JSON ({e}); write one with "
                             f"`dga-compile calibrate MODEL -o plan.json`") from e
        return cls.from_json(data, os.fspath(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "Plan":
        """The plan of a parsed plan file (`to_json`'s dict); ``source`` names it in errors."""
        where = f"plan file {source}" if source else "plan"
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}; this is not a plan file "
                             f"of this version (write one with `dga-compile calibrate`)")
        for key in data:
            if key not in _KEYS:
                raise ValueError(f"{where}: unknown key {key!r}{_did_you_mean(key, _KEYS)} (a plan has {_KEYS})")
        if "sites" not in data:
            raise ValueError(f"{where} has no 'sites'")
        return cls(data["sites"], data.get("measured", {}), source)


def _did_you_mean(key: Any, choices) -> str:
    near = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    return f": did you mean {near[0]!r}?" if near else ""


def _normalise_sites(sites: Any, where: str) -> tuple:
    if isinstance(sites, tuple):          # already normalised (dataclasses.replace, copies)
        sites = {p: e if e == DENSE else dict(e) for p, e in sites}
    if not isinstance(sites, Mapping):
        raise ValueError(f"{where}: 'sites' must map site positions to 'dense' or parameters, got "
                         f"{type(sites).__name__}; e.g. {{7: 'dense', 3: {{'focus_ratio': 0.2}}}}")
    out = {}
    for key, entry in sites.items():
        position = _position(key, where)
        if position in out:
            raise ValueError(f"{where}: site {position} is named twice")
        out[position] = _entry(entry, f"{where}: site {position}")
    return tuple(sorted(out.items()))


def _position(key: Any, where: str) -> int:
    if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
        key = int(key)
    if not isinstance(key, int) or isinstance(key, bool) or key < 0:
        raise ValueError(f"{where}: site {key!r} is not a site position; sites are layer indices ≥ 0 "
                         f"(as DGAConfig.dense_layers), e.g. \"7\"")
    return key


def _entry(entry: Any, where: str) -> Entry:
    if entry == DENSE:
        return DENSE
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: the entry must be 'dense' or an object of op parameters, got {entry!r}; "
                         f"e.g. {{\"focus_ratio\": 0.2, \"window\": 512}}")
    for field in entry:
        if field not in PLAN_FIELDS:
            raise ValueError(f"{where}: unknown field {field!r}{_did_you_mean(field, PLAN_FIELDS)} (a site "
                             f"entry sets {', '.join(PLAN_FIELDS)})")
    try:
        DGAConfig(**entry)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return tuple(sorted(entry.items()))
