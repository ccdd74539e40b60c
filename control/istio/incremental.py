"""Incremental rebuilds: re-read only the files that changed, reuse the rest.

Theory of operation
-------------------
:class:`IncrementalBuilder` gives the same answer as :func:`control.istio.build_snapshot`
(an equal snapshot, the same version, the same report lines in the same order) but keeps,
between calls, what each file produced:

* **Per file** (keyed by path): its ``stat`` signature (size, mtime, ctime, inode), a hash of
  its bytes, and its result: the decoded, validated :class:`Resource` objects and the
  problem / warning lines of its documents. A file whose signature is unchanged is not
  opened; one whose signature changed is read and hashed, and parsed again only when the
  bytes differ. Timestamps have a coarse granularity (a few ms on Linux), so a file
  modified within :data:`RACY_NS` of the moment it was last read is "racily clean" (as git
  calls it): it is re-read and re-hashed until its mtime is safely older than our last read.
* **Whole set**: the cross-resource checks (references between resources, relevance
  warnings) always run on the assembled set; they are linear and cheap. When the content
  version and the resource-to-file attribution are those of the last snapshot, that
  snapshot is returned as is.
* **Translation**: a :class:`~control.istio.translate.TranslationCache` lets the translator
  reuse the routes of unchanged rules (see :meth:`_Translator.route`); everything else is
  translated again, which keeps the result equal to a from-scratch translation.

A change to one file of 10,000 therefore costs one file's parse and validation, plus the
linear passes. The builder is for one caller at a time (the reload thread); the snapshots it
returns are immutable and safe to share.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from control.istio.load import (
    cross_checks,
    decode_text,
    load_documents,
    parse_bytes,
    parse_yaml,
    paused_gc,
    split_documents,
    yaml_files,
)
from control.istio.resources import Resource, Resources
from control.istio.translate import TranslationCache, content_version, translate
from control.istio.validate import ValidationReport
from meshproxy.config.model import ProxyIdentity, Snapshot

__all__ = ["RACY_NS", "IncrementalBuilder"]

RACY_NS = 2_000_000_000
"""A file modified less than this long before we read it is re-hashed on the next build."""


@dataclass(slots=True)
class _FileResult:
    """What one file produced, and how to recognise the same file again."""

    signature: tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
    digest: bytes  # blake2b of the bytes
    read_at_ns: int  # wall clock when the bytes were read
    resources: list[Resource[Any]]  # in document order; ``order`` as of the last assembly
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    offset: int = 0  # the global load order of its first resource at the last assembly
    # multi-document files: document text -> what it gave (only pieces without problems)
    pieces: dict[str, _Piece] = field(default_factory=dict)


@dataclass(slots=True)
class _Piece:
    """One ``---``-separated piece of a multi-document file and what it gave."""

    documents: int  # how many YAML documents it holds (for the next piece's index)
    resources: list[Resource[Any]]  # ``order`` counted from ``base``
    warnings: list[str]
    reusable: bool = True  # False when it had problems (their lines name positions)
    base: int = 0  # the file-local ``order`` of its first resource


class IncrementalBuilder:
    """``build(paths)`` -> ``(Snapshot | None, ValidationReport)``, like
    :func:`control.istio.build_snapshot` for ``proxy``, reusing the work of earlier calls."""

    def __init__(self, proxy: ProxyIdentity, *, racy_ns: int = RACY_NS) -> None:
        self.proxy = proxy
        self.racy_ns = racy_ns
        self._files: dict[str, _FileResult] = {}
        self._cache = TranslationCache(proxy)
        self._last: tuple[str, tuple[str, ...], Snapshot] | None = None
        self.stats: dict[str, int] = {"parsed": 0, "rehashed": 0, "reused": 0}

    def build(self, paths: Sequence[str]) -> tuple[Snapshot | None, ValidationReport]:
        """Load, validate and translate the files under ``paths``: ``(None, report)`` when
        there is any problem, else the snapshot and a report including its warnings."""
        report = ValidationReport()
        with paused_gc():
            files = yaml_files(paths, report)
            now = time.time_ns()
            results: dict[str, _FileResult] = {}
            items: list[Resource[Any]] = []
            stats = {"parsed": 0, "rehashed": 0, "reused": 0}
            for f in files:
                got = self._file(f, now, report, stats)
                if got is None:
                    continue
                results[f] = got
                if got.offset != len(items):  # documents were added or removed before it
                    got.offset = len(items)
                    got.resources = [
                        r if r.order == got.offset + k else replace(r, order=got.offset + k)
                        for k, r in enumerate(got.resources)
                    ]
                items.extend(got.resources)
                report.problems.extend(got.problems)
                report.warnings.extend(got.warnings)
            self._files = results
            self.stats = stats
            resources = Resources.of(items)
            cross_checks(resources, report)
            if report.problems:
                return None, report
            version = content_version(resources)
            owners = tuple(r.file for r in items)
            last = self._last
            if last is not None and last[0] == version and last[1] == owners:
                snap = last[2]
            else:
                snap = translate(resources, self.proxy, version=version, cache=self._cache)
                self._last = (version, owners, snap)
        seen = set(report.warnings)
        report.warnings.extend(w for w in snap.warnings if w not in seen)
        return snap, report

    def _file(
        self, file: str, now: int, report: ValidationReport, stats: dict[str, int]
    ) -> _FileResult | None:
        """The (possibly cached) result of ``file``; None when it cannot be read (the
        problem is then in ``report``)."""
        old = self._files.get(file)
        try:
            st = os.stat(file)
        except OSError as e:
            report.problems.append(f"{file}: cannot read: {e}")
            return None
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if (
            old is not None
            and old.signature == sig
            and max(st.st_mtime_ns, st.st_ctime_ns) + self.racy_ns < old.read_at_ns
        ):
            stats["reused"] += 1
            return old
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except OSError as e:
            report.problems.append(f"{file}: cannot read: {e}")
            return None
        digest = hashlib.blake2b(data, digest_size=20).digest()
        if old is not None and old.digest == digest:
            stats["rehashed"] += 1
            old.signature = sig
            old.read_at_ns = now
            return old
        stats["parsed"] += 1
        own = ValidationReport()
        pieces = self._pieces(file, data, old, own)
        cache: dict[str, _Piece] = {}
        if pieces is None:
            own = ValidationReport()
            docs = parse_bytes(file, data, own)
            resources = load_documents(file, docs, own, start_order=0)
        else:
            resources = []
            for text, piece in pieces:
                base = len(resources)
                if piece.base != base:  # documents were added or removed before it
                    piece.base = base
                    piece.resources = [
                        r if r.order == base + k else replace(r, order=base + k)
                        for k, r in enumerate(piece.resources)
                    ]
                resources.extend(piece.resources)
                if piece.reusable:
                    cache[text] = piece
        return _FileResult(
            signature=sig,
            digest=digest,
            read_at_ns=now,
            resources=resources,
            problems=own.problems,
            warnings=own.warnings,
            offset=0,
            pieces=cache,
        )

    @staticmethod
    def _pieces(
        file: str, data: bytes, old: _FileResult | None, report: ValidationReport
    ) -> list[tuple[str, _Piece]] | None:
        """A multi-document file piece by piece, reusing the pieces whose text is unchanged
        (an edit to one document of a 10,000-document file parses that one only). None when
        the file must be read whole: one document, YAML directives, not UTF-8, or a piece
        that does not parse (the whole file then gives the exact error and line)."""
        if data.count(b"\n---") < 2:
            return None
        text = decode_text(file, data, ValidationReport())
        if text is None:
            return None
        texts = split_documents(text)
        if texts is None:
            return None
        known = old.pieces if old is not None else {}
        out: list[tuple[str, _Piece]] = []
        fresh: dict[str, _Piece] = {}
        index = 0
        for t in texts:
            piece = known.get(t) or fresh.get(t)
            if piece is None:
                try:
                    docs = parse_yaml(t)
                except (yaml.YAMLError, RecursionError):
                    return None
                own = ValidationReport()
                resources = load_documents(file, docs, own, start_order=0, start_index=index)
                report.problems.extend(own.problems)
                report.warnings.extend(own.warnings)
                # a piece with problems is not reused: its lines name document positions
                piece = _Piece(len(docs), resources, own.warnings, reusable=not own.problems)
                if piece.reusable:
                    fresh[t] = piece
            else:
                report.warnings.extend(piece.warnings)
            index += piece.documents
            out.append((t, piece))
        return out

    def __repr__(self) -> str:
        version = self._last[0] if self._last is not None else None
        return f"IncrementalBuilder(files={len(self._files)}, version={version!r}, {self._cache!r})"
