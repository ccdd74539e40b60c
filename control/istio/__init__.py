"""Istio configuration for meshproxy: typed resources, validation and the pure translation.

Theory of operation
-------------------
Istio YAML -> :func:`load_paths` (YAML parsing, schema decoding into the frozen dataclasses of
:mod:`control.istio.resources`, Istio's validation rules, cross-resource checks) ->
:func:`translate` (pure: typed resources + the proxy's identity -> one immutable
:class:`meshproxy.config.model.Snapshot`). :func:`validate_paths` is the core of
``meshproxy validate``; :func:`build_snapshot` is what standalone mode and the control plane
call; :class:`IncrementalBuilder` gives the same answers while re-reading only the files that
changed (what the reload paths should use). Every problem is one line
``FILE: Kind/name: field.path: message``.
"""

from control.istio.incremental import IncrementalBuilder
from control.istio.load import Loaded, load_documents, load_paths, validate_paths
from control.istio.resources import Resource, Resources
from control.istio.translate import (
    TranslationCache,
    build_snapshot,
    content_version,
    translate,
)
from control.istio.validate import ValidationReport

__all__ = [
    "IncrementalBuilder",
    "Loaded",
    "Resource",
    "Resources",
    "TranslationCache",
    "ValidationReport",
    "build_snapshot",
    "content_version",
    "load_documents",
    "load_paths",
    "translate",
    "validate_paths",
]
