"""Provenance: which Istio resource (and where in it) a piece of the snapshot came from.

A leaf module (stdlib only, no imports from the rest of meshproxy) so that every model module
(:mod:`meshproxy.config.model`, :mod:`meshproxy.config.security`) can use it without import
cycles; ``meshproxy.config.model`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Meta:
    """Which Istio resource (and where in it) an object came from."""

    kind: str
    name: str
    namespace: str = "default"
    file: str = ""
    path: str = ""  # field path inside the resource, e.g. "spec.http[0]"

    @property
    def ref(self) -> str:
        """``Kind/namespace/name``, the form used in logs and /config_dump."""
        return f"{self.kind}/{self.namespace}/{self.name}"

    def as_dict(self) -> dict[str, str]:
        d = {"kind": self.kind, "name": self.name, "namespace": self.namespace}
        if self.file:
            d["file"] = self.file
        if self.path:
            d["path"] = self.path
        return d
