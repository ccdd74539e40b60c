"""The control plane's view of its config directory: validated resources with their documents.

Theory of operation
-------------------
:class:`ConfigStore` reads every ``*.yaml``/``*.yml`` under the configured paths with the same
parser and validator as ``meshproxy validate`` and standalone mode (``control.istio``), and
keeps, with each valid :class:`~control.istio.Resource`, the document it came from: that
document is what goes on the wire to the proxies that need it (see :mod:`control.protocol`).

A load is all or nothing. When any file has a problem, :meth:`ConfigStore.load` returns a
:class:`LoadOutcome` with the problem lines (``FILE: Kind/name: field.path: message``) and no
config; the caller keeps serving the last valid :class:`Config`, so invalid content is never
pushed. (The Kubernetes source uses the same :func:`assemble` but drops invalid objects one by
one instead: see :mod:`control.kube`.) Files are re-parsed only when their bytes change (a per-
file cache keyed by path and a BLAKE2b digest of the content), so an edit to one file of many
costs one parse plus the cross-resource checks, which always run on the assembled set.

A :class:`Config` is immutable. Its ``version`` is :func:`control.protocol.config_version` over
every document's digest in load order: the same content gives the same version, also across
restarts. Loading runs in a worker thread (the caller uses ``asyncio.to_thread``); the store is
for one loader at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from control.istio.load import (
    cross_checks,
    load_documents,
    parse_bytes,
    paused_gc,
    yaml_files,
)
from control.istio.resources import Resource, Resources
from control.istio.validate import ValidationReport
from control.protocol import config_version

__all__ = ["Config", "ConfigStore", "DocumentSource", "LoadOutcome", "assemble"]


@dataclass(frozen=True, slots=True)
class Config:
    """One valid state of the directory: resources (load order) and, by ``order``, the
    document each came from."""

    version: str
    resources: Resources
    documents: tuple[dict[str, Any], ...]  # documents[r.order] is r's document
    warnings: tuple[str, ...] = ()

    def document(self, r: Resource[Any]) -> dict[str, Any]:
        return self.documents[r.order]

    def __repr__(self) -> str:
        return f"Config(version={self.version!r}, resources={len(self.resources)})"


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """What one load gave: ``config`` is None when there were ``problems``, except from a
    source that drops what is invalid and keeps the rest (:class:`control.kube.KubeStore`):
    then ``problems`` are those of the objects left out of ``config``."""

    config: Config | None
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    files: int = 0


@dataclass(slots=True)
class _File:
    digest: bytes
    pairs: list[tuple[Resource[Any], dict[str, Any]]]  # order counted from 0 in this file
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def assemble(
    pairs: Sequence[tuple[Resource[Any], dict[str, Any]]],
    report: ValidationReport,
    inputs: int,
    *,
    drop_invalid: bool = False,
) -> LoadOutcome:
    """The outcome of one load: the valid resources with their documents, in load order,
    renumbered, cross-checked and versioned (no config when ``report`` has any problem).

    With ``drop_invalid`` (the Kubernetes source: ``pairs`` then holds only the resources that
    validated on their own), a resource that fails a cross-resource check is dropped instead
    -- its problems stay in the outcome, the file part of each problem line naming it -- and
    the rest is checked again, so the outcome has a config *and* problems."""
    kept = list(pairs)
    while True:
        resources: list[Resource[Any]] = []
        documents: list[dict[str, Any]] = []
        for r, doc in kept:
            order = len(resources)
            resources.append(r if r.order == order else replace(r, order=order))
            documents.append(doc)
        grouped = Resources.of(resources)
        checked = ValidationReport()
        cross_checks(grouped, checked)
        if not drop_invalid or not checked.problems:
            break
        bad = {p.split(": ", 1)[0] for p in checked.problems}
        remaining = [(r, d) for r, d in kept if r.file not in bad]
        if len(remaining) == len(kept):
            break  # a problem no resource can be blamed for: reported, the rest still goes
        report.problems.extend(checked.problems)
        kept = remaining
    report.extend(checked)
    if report.problems and not drop_invalid:
        return LoadOutcome(None, tuple(report.problems), tuple(report.warnings), inputs)
    config = Config(
        version=config_version(r.digest for r in resources),
        resources=grouped,
        documents=tuple(documents),
        warnings=tuple(report.warnings),
    )
    return LoadOutcome(config, tuple(report.problems), tuple(report.warnings), inputs)


class DocumentSource(Protocol):
    """What :class:`control.server.ControlPlane` loads configs from: :class:`ConfigStore` (a
    directory) or :class:`control.kube.KubeStore` (the Kubernetes API). ``load`` runs in a
    worker thread, one at a time; ``parsed`` is how many inputs the last load parsed again."""

    parsed: int

    def load(self) -> LoadOutcome: ...


class ConfigStore:
    """Loads ``paths`` into a :class:`Config`, reusing unchanged files' work."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._files: dict[str, _File] = {}
        self.parsed = 0  # files parsed by the last load (the rest were reused)

    def load(self) -> LoadOutcome:
        report = ValidationReport()
        with paused_gc():
            files = yaml_files(self.paths, report)
            cache: dict[str, _File] = {}
            pairs: list[tuple[Resource[Any], dict[str, Any]]] = []
            self.parsed = 0
            for f in files:
                got = self._file(f, report)
                if got is None:
                    continue
                cache[f] = got
                report.problems.extend(got.problems)
                report.warnings.extend(got.warnings)
                pairs.extend(got.pairs)
            self._files = cache
            return assemble(pairs, report, len(files))

    def _file(self, file: str, report: ValidationReport) -> _File | None:
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except OSError as e:
            report.problems.append(f"{file}: cannot read: {e}")
            return None
        digest = hashlib.blake2b(data, digest_size=20).digest()
        old = self._files.get(file)
        if old is not None and old.digest == digest:
            return old
        self.parsed += 1
        own = ValidationReport()
        docs = parse_bytes(file, data, own)
        pairs: list[tuple[Resource[Any], dict[str, Any]]] = []
        for index, doc in enumerate(docs):
            got = load_documents(file, [doc], own, start_order=len(pairs), start_index=index)
            if got:
                pairs.append((got[0], doc))
        return _File(digest, pairs, own.problems, own.warnings)

    def __repr__(self) -> str:
        return f"ConfigStore(paths={self.paths!r}, files={len(self._files)})"
