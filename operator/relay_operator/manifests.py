"""Manifests from files: MailRelay, RelayRoute and Secret documents, grouped by namespace.

`mailrelay render`, `mailrelay check` and `mailrelay up` read what a user would `kubectl
apply`: files or folders (searched recursively for .yaml, .yml, .json), each holding one or
more YAML documents, possibly `kind: List`. Documents of other kinds are skipped and reported;
a document without a namespace lands in the default namespace, as kubectl does.

This module reads files and nothing else. Unreadable files, broken YAML and duplicate objects
raise `ManifestError` (the CLI turns it into exit status 2); everything about whether the
objects make sense is `topology`'s business.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay_operator import naming

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"


class ManifestError(Exception):
    """Input that cannot be read at all; the message names the file and the problem."""


@dataclass(frozen=True)
class NamespaceManifests:
    namespace: str
    relays: tuple[dict[str, Any], ...] = ()
    routes: tuple[dict[str, Any], ...] = ()
    secrets: tuple[dict[str, Any], ...] = ()

    def secret(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.secrets if s.get("metadata", {}).get("name") == name), None)


@dataclass(frozen=True)
class ManifestSet:
    namespaces: Mapping[str, NamespaceManifests]
    files: tuple[Path, ...] = ()
    skipped: tuple[str, ...] = field(default=())  # "file: kind name" of documents not ours

    @property
    def relay_count(self) -> int:
        return sum(len(ns.relays) for ns in self.namespaces.values())

    @property
    def route_count(self) -> int:
        return sum(len(ns.routes) for ns in self.namespaces.values())


def manifest_files(paths: Iterable[Path | str]) -> list[Path]:
    """The files behind the given paths: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if str(raw) == STDIN:
            files.append(Path(STDIN))
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or folder")
    return files


def _read(path: Path) -> str:
    if str(path) == STDIN:
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from exc


def _documents(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        loaded = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    documents: list[dict[str, Any]] = []
    for index, doc in enumerate(loaded):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: document {index + 1} is not a mapping")
        if str(doc.get("kind", "")).endswith("List") and "items" in doc:
            items = doc.get("items") or []
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ManifestError(f"{path}: document {index + 1}: items of a List must be mappings")
            documents.extend(items)
        else:
            documents.append(doc)
    return documents


def parse_documents(sources: Sequence[tuple[str, str]], default_namespace: str = "default") -> ManifestSet:
    """(name, text) pairs → a ManifestSet; `load_manifests` reads the files for this."""
    return group_documents(
        [(source, doc) for source, text in sources for doc in _documents(Path(source), text)],
        default_namespace,
    )


def group_documents(
    documents: Sequence[tuple[str, Mapping[str, Any]]], default_namespace: str = "default"
) -> ManifestSet:
    """(source, decoded document) pairs → a ManifestSet, for callers that hold bodies already."""
    relays: dict[str, list[dict[str, Any]]] = {}
    routes: dict[str, list[dict[str, Any]]] = {}
    secrets: dict[str, list[dict[str, Any]]] = {}
    seen: dict[tuple[str, str, str], str] = {}
    skipped: list[str] = []
    for source, doc in documents:
        kind = str(doc.get("kind") or "")
        api_version = str(doc.get("apiVersion") or "")
        metadata = doc.get("metadata")
        if not kind and not api_version and "listeners" in doc:
            raise ManifestError(
                f"{source}: this is a relay config file, not a Kubernetes manifest; "
                "run it with `mailrelay relay --config` or leave it out of -f"
            )
        if not isinstance(metadata, dict) or not metadata.get("name"):
            raise ManifestError(f"{source}: a {kind or 'document'} has no metadata.name")
        name = str(metadata["name"])
        if kind in (naming.MAILRELAY_KIND, naming.RELAYROUTE_KIND) and api_version.startswith(
            naming.GROUP + "/"
        ):
            if api_version != naming.API_VERSION:
                raise ManifestError(
                    f"{source}: {kind} {name}: apiVersion {api_version} is not served; "
                    f"use {naming.API_VERSION}"
                )
            target = relays if kind == naming.MAILRELAY_KIND else routes
        elif kind == "Secret" and api_version == "v1":
            target = secrets
        else:
            skipped.append(f"{source}: {kind or '?'} {name}")
            continue
        namespace = str(metadata.get("namespace") or default_namespace)
        identity = (kind, namespace, name)
        if identity in seen:
            raise ManifestError(f"{source}: {kind} {namespace}/{name} is also defined in {seen[identity]}")
        seen[identity] = source
        body = dict(doc)
        body["metadata"] = {**metadata, "namespace": namespace}
        target.setdefault(namespace, []).append(body)
    namespaces = sorted(set(relays) | set(routes) | set(secrets))
    return ManifestSet(
        namespaces={
            ns: NamespaceManifests(
                namespace=ns,
                relays=tuple(relays.get(ns, ())),
                routes=tuple(routes.get(ns, ())),
                secrets=tuple(secrets.get(ns, ())),
            )
            for ns in namespaces
        },
        skipped=tuple(skipped),
    )


def load_manifests(paths: Iterable[Path | str], default_namespace: str = "default") -> ManifestSet:
    """Read every manifest under `paths` (files, folders, or "-" for standard input)."""
    files = manifest_files(paths)
    if not files:
        raise ManifestError("no manifest files found (looked for *.yaml, *.yml, *.json)")
    loaded = parse_documents([(str(path), _read(path)) for path in files], default_namespace)
    return ManifestSet(namespaces=loaded.namespaces, files=tuple(files), skipped=loaded.skipped)


def secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """The files a Secret becomes when mounted: `data` (base64) and `stringData` merged, as the
    API server does (stringData wins)."""
    files: dict[str, bytes] = {}
    name = secret.get("metadata", {}).get("name", "?")
    for key, value in (secret.get("data") or {}).items():
        try:
            files[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ManifestError(f"Secret {name}: data.{key} is not base64") from exc
    for key, value in (secret.get("stringData") or {}).items():
        files[str(key)] = str(value).encode()
    return files
