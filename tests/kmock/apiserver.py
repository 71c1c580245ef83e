#!/usr/bin/env python3
"""An emulated Kubernetes API server for profiles-sync's tests, built on kmock.

    .venv-kmock/bin/python tests/kmock/apiserver.py --port 0 [--verbose]

prints exactly one line ``READY <port>`` on stdout once it serves plain HTTP on
127.0.0.1:<port>, then runs until SIGTERM/SIGINT or until its stdin (when it is
a pipe or socket) reaches EOF -- so a harness that spawns it with a piped stdin
takes it down with it.  See tests/kmock/README.md for what it does and doesn't.

kmock (PyPI) gives the HTTP server (``kmock.Server``), the ``KubernetesEmulator``
whose object store (``.objects``, with per-object history) and resource registry
(``.resources``, seeded from kmock's bundled built-in discovery data) we use.
kmock's own request semantics are too naive for kube-rs and kubectl (no
resourceVersion/uid/generation, no PUT, no 409 on stale writes, status and spec
mixed, ``/api/v1`` says ``groupVersion: /v1``, ``/api/v1/namespaces`` crashes its
URL parser, watch ignores resourceVersion ...), so this runner answers every
request itself (``__call__`` is overridden) with the semantics below.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import datetime
import json
import os
import re
import signal
import stat
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[2]
try:
    import aiohttp.web
    import jsonpatch
    import kmock
    import yaml
except ImportError:  # run with a python outside the venv: re-exec with the venv's (tests/kmock/install.sh)
    VENV_PY = Path(os.environ.get('KMOCK_PYTHON') or REPO / '.venv-kmock' / 'bin' / 'python')
    if VENV_PY.exists() and not os.environ.get('KMOCK_REEXEC'):  # (a venv's python is a symlink: no resolve())
        os.environ['KMOCK_REEXEC'] = '1'
        os.execv(str(VENV_PY), [str(VENV_PY), __file__, *sys.argv[1:]])
    sys.exit(f'apiserver.py: kmock is not installed for {sys.executable}; run tests/kmock/install.sh')
SERVER_VERSION = {
    'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-kmock', 'gitCommit': 'kmock',
    'gitTreeState': 'clean', 'buildDate': '2025-01-01T00:00:00Z', 'goVersion': 'go1.23',
    'compiler': 'gc', 'platform': 'linux/amd64',
}

# The built-in kinds the operator uses; their discovery metadata (kind, verbs, shortNames,
# categories) comes from kmock's bundled discovery dump. Only the status subresource is served.
BUILTINS: dict[tuple[str, str], list[str]] = {
    ('', 'v1'): ['namespaces', 'secrets', 'configmaps', 'pods', 'events', 'serviceaccounts', 'services'],
    ('batch', 'v1'): ['jobs'],
    ('coordination.k8s.io', 'v1'): ['leases'],
    ('events.k8s.io', 'v1'): ['events'],
    ('apps', 'v1'): ['deployments'],
    ('rbac.authorization.k8s.io', 'v1'): ['roles', 'rolebindings', 'clusterroles', 'clusterrolebindings'],
    ('apiextensions.k8s.io', 'v1'): ['customresourcedefinitions'],
    ('policy', 'v1'): ['poddisruptionbudgets'],
    ('networking.k8s.io', 'v1'): ['networkpolicies'],
}
GENERATION_GROUPS = {'apps', 'batch', 'policy', 'networking.k8s.io', 'apiextensions.k8s.io'}
INITIAL_NAMESPACES = ['default', 'kube-system', 'kube-public', 'kube-node-lease']
# Resources whose API default propagationPolicy is Orphan (legacy; kubectl always sends Background).
ORPHAN_BY_DEFAULT = {('batch', 'v1', 'jobs')}
# Strategic-merge-patch merge keys (by field name; built-in kinds only). 'ports' is special-cased.
SMP_MERGE_KEYS = {
    'containers': 'name', 'initContainers': 'name', 'ephemeralContainers': 'name', 'env': 'name',
    'volumes': 'name', 'volumeMounts': 'mountPath', 'volumeDevices': 'devicePath',
    'imagePullSecrets': 'name', 'hostAliases': 'ip', 'conditions': 'type',
    'ownerReferences': 'uid', 'topologySpreadConstraints': 'topologyKey', 'resourceClaims': 'name',
    'readinessGates': 'conditionType', 'secrets': 'name',
}
SMP_SET_LISTS = {'finalizers'}  # lists of scalars merged as sets
NAME_RE = re.compile(r'^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')
LOG = None  # set in main(): a callable writing one line to stderr, or None


def now_ts() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


class ApiError(Exception):
    REASONS = {400: 'BadRequest', 403: 'Forbidden', 404: 'NotFound', 405: 'MethodNotAllowed',
               406: 'NotAcceptable', 409: 'Conflict', 410: 'Expired', 415: 'UnsupportedMediaType',
               422: 'Invalid', 500: 'InternalError'}

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or self.REASONS.get(code, 'Unknown')
        self.details = details

    def body(self) -> dict:
        body = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                'message': self.message, 'reason': self.reason, 'code': self.code}
        if self.details:
            body['details'] = self.details
        return body


class Res:
    """One served group/version/resource."""

    def __init__(self, group: str, version: str, plural: str, *, kind: str, namespaced: bool,
                 singular: str = '', verbs: Iterable[str] = (), short: Iterable[str] = (),
                 categories: Iterable[str] = (), status: bool = False, crd: str | None = None,
                 schema: dict | None = None, columns: list | None = None, selectable: Iterable[str] = ()):
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.namespaced, self.singular = namespaced, singular or kind.lower()
        self.verbs = sorted(verbs or ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'])
        self.short, self.categories = list(short), list(categories)
        self.status, self.crd, self.schema = status, crd, schema
        self.columns, self.selectable = columns or [], list(selectable)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def has_generation(self) -> bool:
        """Kinds whose metadata.generation a real server maintains (custom resources, workloads, ...);
        Secrets, ConfigMaps, Events, Leases, RBAC objects etc. have none."""
        return self.crd is not None or self.group in GENERATION_GROUPS

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def group_resource(self) -> str:  # as in error messages: "secrets", "jobs.batch"
        return f'{self.plural}.{self.group}' if self.group else self.plural

    @property
    def kmock_resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)


# ----------------------------------------------------------------------------------------------
# Patching, pruning, selectors, tables
# ----------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes; lists and scalars replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 via the `jsonpatch` package, op by op, with the apiserver's (evanphx/json-patch)
    leniency: `test` with value null succeeds when the path is absent.  kube-runtime's finalizer
    helper relies on it ({"op":"test","path":"/metadata/finalizers","value":null} before an add)."""
    for op in ops:
        if isinstance(op, dict) and op.get('op') == 'test' and op.get('value', 0) is None:
            try:
                current = jsonpatch.JsonPointer(op.get('path', '')).resolve(doc)
            except jsonpatch.JsonPointerException:
                continue
            if current is not None:
                raise jsonpatch.JsonPatchTestFailed(f'{current!r} is not equal to tested value None')
            continue
        doc = jsonpatch.apply_patch(doc, [op])
    return doc


# core/v1 Events and events.k8s.io/v1 Events are one store on a real server, seen through two
# APIs; here each write to one is mirrored (same uid and resourceVersion) into the other.
EVENT_TWINS = {('', 'v1', 'events'): ('events.k8s.io', 'v1', 'events'),
               ('events.k8s.io', 'v1', 'events'): ('', 'v1', 'events')}
_EVENT_FIELDS = [('regarding', 'involvedObject'), ('note', 'message'), ('reportingController', 'reportingComponent'),
                 ('deprecatedSource', 'source'), ('deprecatedFirstTimestamp', 'firstTimestamp'),
                 ('deprecatedLastTimestamp', 'lastTimestamp'), ('deprecatedCount', 'count')]


def convert_event(obj: dict, to: 'Res') -> dict:
    out = copy.deepcopy(obj)
    for v1_name, core_name in _EVENT_FIELDS:
        src, dst = (v1_name, core_name) if to.group == '' else (core_name, v1_name)
        if src in out:
            out[dst] = out.pop(src)
    out['apiVersion'], out['kind'] = to.api_version, 'Event'
    return out


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items()
                if not (k.startswith('$') or k.startswith('$setElementOrder/'))}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def strategic_merge(orig: Any, patch: Any, directives: bool = True) -> Any:
    """A subset of strategic merge patch: merge keys for well-known list fields (SMP_MERGE_KEYS),
    set-merge for finalizers, and the $patch (replace/delete), $deleteFromPrimitiveList and
    $setElementOrder (ignored) directives.  Everything else behaves like a JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if directives and patch.get('$patch') == 'replace':
        return _strip_directives({k: v for k, v in patch.items() if k != '$patch'})
    result = dict(orig) if isinstance(orig, dict) else {}
    deletions = []
    for key, value in patch.items():
        if key.startswith('$'):
            if directives and key.startswith('$deleteFromPrimitiveList/'):
                deletions.append((key.split('/', 1)[1], value or []))
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            if directives and value.get('$patch') == 'delete':
                result.pop(key, None)
            else:
                result[key] = strategic_merge(result.get(key), value, directives)
        elif isinstance(value, list) and isinstance(result.get(key), list) and (key in SMP_MERGE_KEYS or key in SMP_SET_LISTS or key == 'ports'):
            result[key] = _merge_list(key, result[key], value, directives)
        else:
            result[key] = _strip_directives(copy.deepcopy(value))
    for key, values in deletions:
        if isinstance(result.get(key), list):
            result[key] = [v for v in result[key] if v not in values]
    return result


def _merge_list(field: str, orig: list, patch: list, directives: bool) -> list:
    if field in SMP_SET_LISTS:
        out = list(orig)
        out += [v for v in patch if v not in out]
        return out
    mkey = SMP_MERGE_KEYS.get(field)
    if field == 'ports':
        mkey = 'containerPort' if any(isinstance(p, dict) and 'containerPort' in p for p in orig + patch) else 'port'
    out = [copy.deepcopy(v) for v in orig]
    for item in patch:
        if not isinstance(item, dict) or mkey not in item:
            out.append(_strip_directives(copy.deepcopy(item)))
            continue
        idx = next((i for i, o in enumerate(out) if isinstance(o, dict) and o.get(mkey) == item[mkey]), None)
        if directives and item.get('$patch') == 'delete':
            if idx is not None:
                del out[idx]
        elif idx is None:
            out.append(_strip_directives(copy.deepcopy(item)))
        else:
            out[idx] = strategic_merge(out[idx], item, directives)
    return out


def removed_paths(prev: Any, new: Any, path: tuple = ()) -> list[tuple]:
    """Leaf paths (dict keys) present in prev but absent in new -- for the apply approximation."""
    if not isinstance(prev, dict) or not isinstance(new, dict):
        return []
    out = []
    for key, value in prev.items():
        if key not in new:
            out.append(path + (key,))
        else:
            out += removed_paths(value, new[key], path + (key,))
    return out


def prune_and_default(schema: dict | None, value: Any, path: str, unknown: list[str]) -> Any:
    """Structural-schema pruning of unknown fields and application of `default`s (as a real
    API server does for custom resources).  No other validation (types, enums, CEL) is done."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get('properties')
        addl = schema.get('additionalProperties')
        preserve = schema.get('x-kubernetes-preserve-unknown-fields') or schema.get('x-kubernetes-embedded-resource')
        if props is None and addl is None and preserve:
            return value
        result = {}
        for key, sub in value.items():
            subpath = f'{path}.{key}' if path else key
            if props and key in props:
                subschema = props[key]
            elif isinstance(addl, dict):
                subschema = addl
            elif addl is True or preserve:
                result[key] = sub
                continue
            else:
                unknown.append(subpath)
                continue
            if sub is None and not subschema.get('nullable'):
                continue  # nulls of non-nullable fields are dropped (and may then be defaulted)
            result[key] = prune_and_default(subschema, sub, subpath, unknown)
        for key, subschema in (props or {}).items():
            if key not in result and isinstance(subschema, dict) and 'default' in subschema:
                result[key] = prune_and_default(subschema, copy.deepcopy(subschema['default']), f'{path}.{key}', [])
        return result
    if isinstance(value, list) and isinstance(schema.get('items'), dict):
        return [prune_and_default(schema['items'], v, f'{path}[{i}]', unknown) for i, v in enumerate(value)]
    return value


def parse_label_selector(text: str | None) -> list[tuple]:
    if not text:
        return []
    parts, depth, cur = [], 0, ''
    for ch in text:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    reqs = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if m := re.fullmatch(r'([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)', part):
            reqs.append((m[2], m[1], {v.strip() for v in m[3].split(',') if v.strip()}))
        elif m := re.fullmatch(r'([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)', part):
            reqs.append(('!=' if m[2] == '!=' else '=', m[1], m[3]))
        elif m := re.fullmatch(r'!\s*([\w./-]+)', part):
            reqs.append(('!', m[1], None))
        elif m := re.fullmatch(r'([\w./-]+)', part):
            reqs.append(('exists', m[1], None))
        else:
            raise ApiError(400, f'unable to parse requirement: {part!r} in labelSelector {text!r}')
    return reqs


def labels_match(reqs: list[tuple], labels: dict) -> bool:
    for op, key, val in reqs:
        have = key in labels
        if op == '=' and labels.get(key) != val:
            return False
        if op == '!=' and have and labels[key] == val:
            return False
        if op == 'in' and (not have or labels[key] not in val):
            return False
        if op == 'notin' and have and labels[key] in val:
            return False
        if op == 'exists' and not have:
            return False
        if op == '!' and have:
            return False
    return True


def parse_field_selector(text: str | None, res: Res) -> list[tuple]:
    if not text:
        return []
    reqs = []
    for part in (p.strip() for p in text.split(',')):
        if not part:
            continue
        m = re.fullmatch(r'([\w.\-/]+)\s*(==|=|!=)\s*(.*)', part)
        if not m:
            raise ApiError(400, f'invalid selector: {part!r}; can\'t understand {text!r}')
        field = m[1]
        if res.crd is not None and field not in ('metadata.name', 'metadata.namespace') and field not in res.selectable:
            raise ApiError(400, f'"{field}" is not a known field selector: only "metadata.name", "metadata.namespace"',
                           reason='BadRequest')
        reqs.append((m[2] != '!=', field, m[3]))
    return reqs


def field_value(obj: dict, path: str) -> str:
    cur: Any = obj
    for part in path.split('.'):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ''
    if isinstance(cur, bool):
        return 'true' if cur else 'false'
    return str(cur)


def fields_match(reqs: list[tuple], obj: dict) -> bool:
    return all((field_value(obj, f) == v) == positive for positive, f, v in reqs)


_JP_TOKEN = re.compile(r"""\.([A-Za-z0-9_$-]+)|\[(\d+)\]|\[\*\]|\[['"]([^'"]+)['"]\]|"""
                       r"""\[\?\(@\.([\w.-]+)\s*==\s*['"]([^'"]*)['"]\)\]""")


def jsonpath(obj: Any, expr: str) -> Any:
    """The JSONPath subset used by additionalPrinterColumns; returns the first match or None."""
    expr = expr.strip()
    if expr.startswith('{') and expr.endswith('}'):
        expr = expr[1:-1]
    if expr.startswith('$'):
        expr = expr[1:]
    values = [obj]
    pos = 0
    while pos < len(expr):
        m = _JP_TOKEN.match(expr, pos)
        if not m:
            return None
        pos = m.end()
        nxt = []
        for v in values:
            if m[1] is not None or m[3] is not None:
                if isinstance(v, dict) and (m[1] or m[3]) in v:
                    nxt.append(v[m[1] or m[3]])
            elif m[2] is not None:
                if isinstance(v, list) and int(m[2]) < len(v):
                    nxt.append(v[int(m[2])])
            elif m[4] is not None:
                if isinstance(v, list):
                    nxt += [i for i in v if isinstance(i, dict) and field_value(i, m[4]) == m[5]]
            else:
                if isinstance(v, list):
                    nxt += v
                elif isinstance(v, dict):
                    nxt += list(v.values())
        values = nxt
    return values[0] if values else None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    if seconds < -1:
        return '<invalid>'
    if seconds < 0:
        return '0s'
    s = int(seconds)
    if s < 120:
        return f'{s}s'
    minutes = s // 60
    if minutes < 10:
        return f'{minutes}m' if s % 60 == 0 else f'{minutes}m{s % 60}s'
    if minutes < 180:
        return f'{minutes}m'
    hours = s // 3600
    if hours < 8:
        return f'{hours}h' if minutes % 60 == 0 else f'{hours}h{minutes % 60}m'
    if hours < 48:
        return f'{hours}h'
    if hours < 24 * 8:
        return f'{hours // 24}d' if hours % 24 == 0 else f'{hours // 24}d{hours % 24}h'
    if hours < 24 * 365 * 2:
        return f'{hours // 24}d'
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f'{hours // 24 // 365}y' if dy == 0 else f'{hours // 24 // 365}y{dy}d'
    return f'{hours // 24 // 365}y'


def age_of(ts: Any) -> str | None:
    if not isinstance(ts, str):
        return None
    try:
        then = datetime.datetime.strptime(ts[:19], '%Y-%m-%dT%H:%M:%S').replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())


def parse_accept(accept: str) -> str | None:
    """Returns 'Table', 'PartialObjectMetadata', 'PartialObjectMetadataList' or None (plain)."""
    for media in accept.split(','):
        params = dict(p.strip().split('=', 1) for p in media.split(';')[1:] if '=' in p)
        if params.get('g') == 'meta.k8s.io' and params.get('as') in ('Table', 'PartialObjectMetadata', 'PartialObjectMetadataList'):
            return params['as']
        if media.split(';')[0].strip() in ('application/json', '*/*', 'application/*'):
            return None
    return None


def partial_metadata(obj: dict) -> dict:
    return {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1', 'metadata': obj.get('metadata', {})}


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------

class Watcher:
    def __init__(self, res: Res, namespace: str | None, name: str | None, labels: list, fields: list):
        self.res, self.namespace, self.name, self.labels, self.fields = res, namespace, name, labels, fields
        self.queue: asyncio.Queue = asyncio.Queue()

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get('metadata', {})
        if self.namespace is not None and meta.get('namespace') != self.namespace:
            return False
        if self.name is not None and meta.get('name') != self.name:
            return False
        return labels_match(self.labels, meta.get('labels') or {}) and fields_match(self.fields, obj)

    def offer(self, etype: str, obj: dict, old: dict | None) -> None:
        now, before = self.matches(obj), self.matches(old)
        if etype == 'MODIFIED':
            etype = 'MODIFIED' if now and before else 'ADDED' if now else 'DELETED' if before else ''
            if etype == 'DELETED':
                now = True
        if etype and now:
            self.queue.put_nowait((etype, obj))


class Apiserver(kmock.KubernetesEmulator):
    """kmock's emulator with the runner's own request handling (see module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.registry: dict[tuple[str, str, str], Res] = {}
        self.rv = 0
        self.log: collections.deque = collections.deque()
        self.log_floor = 0
        self.log_limit = 10_000
        self.history_limit = 20
        self.watchers: list[Watcher] = []
        self.applied: dict[tuple, dict] = {}  # (res key, ns, name, manager, sub) -> last applied config
        self.bookmark_interval = 10.0
        self.stopping = asyncio.Event()
        self.address = ''
        self.serve_openapi = True
        self.in_gc = False

    # ---------------- registry ----------------

    def register(self, res: Res) -> None:
        self.registry[res.key] = res
        self.resources[res.kmock_resource] = kmock.ResourceInfo(
            kind=res.kind, singular=res.singular, namespaced=res.namespaced, verbs=set(res.verbs),
            shortnames=set(res.short), categories=set(res.categories),
            subresources={'status'} if res.status else set())

    def register_builtins(self, everything: bool = False) -> None:
        bundled = kmock.ResourcesArray()
        bundled.load_bundled()
        for r in list(bundled):
            info = bundled[r]
            wanted = BUILTINS.get((r.group, r.version), [])
            if not everything and r.plural not in wanted:
                continue
            if r.group.endswith('metrics.k8s.io') or r.group.startswith('gateway.'):
                continue
            self.register(Res(r.group, r.version, r.plural, kind=info.kind, namespaced=bool(info.namespaced),
                              singular=info.singular or '', verbs=info.verbs, short=info.shortnames,
                              categories=info.categories, status='status' in info.subresources))

    def register_crd(self, crd: dict) -> None:
        spec = crd.get('spec', {})
        names = spec.get('names', {})
        group = spec.get('group', '')
        for res in [r for r in self.registry.values() if r.crd == crd['metadata']['name']]:
            del self.registry[res.key]
        for ver in spec.get('versions', []):
            if not ver.get('served', True):
                continue
            self.register(Res(
                group, ver['name'], names['plural'], kind=names['kind'], singular=names.get('singular', ''),
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced', short=names.get('shortNames', []),
                categories=names.get('categories', []), status='status' in (ver.get('subresources') or {}),
                crd=crd['metadata']['name'], schema=(ver.get('schema') or {}).get('openAPIV3Schema'),
                columns=ver.get('additionalPrinterColumns') or [],
                selectable=[f['jsonPath'].lstrip('.') for f in ver.get('selectableFields') or []]))

    def crd_status(self, crd: dict) -> dict:
        spec = crd.get('spec', {})
        ts = now_ts()
        storage = [v['name'] for v in spec.get('versions', []) if v.get('storage')]
        return {
            'acceptedNames': spec.get('names', {}),
            'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                 'message': 'no conflicts found', 'lastTransitionTime': ts},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                 'message': 'the initial names have been accepted', 'lastTransitionTime': ts},
            ],
            'storedVersions': storage,
        }

    def load_crd_files(self, dirs: list[Path]) -> int:
        count = 0
        crd_res = self.registry[('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')]
        for d in dirs:
            for path in sorted(d.glob('*.yaml')) + sorted(d.glob('*.yml')):
                for doc in yaml.safe_load_all(path.read_text()):
                    if isinstance(doc, dict) and doc.get('kind') == 'CustomResourceDefinition':
                        self.create(crd_res, None, doc, {})
                        count += 1
        return count

    # ---------------- store ----------------

    def key(self, res: Res, ns: str | None, name: str) -> tuple:
        return (res.kmock_resource, ns if res.namespaced else None, name)

    def get_obj(self, res: Res, ns: str | None, name: str) -> dict | None:
        k = self.key(res, ns, name)
        if k not in self.objects:
            return None
        o = self.objects[k]
        return None if o.deleted else o.raw

    def iter_objs(self, res: Res, ns: str | None = None) -> list[dict]:
        out = []
        for (r, ons, _), o in self.objects.items():
            if r.group == res.group and r.version == res.version and r.plural == res.plural and not o.deleted:
                if ns is None or ons == ns:
                    out.append(o.raw)
        return out

    def all_live(self) -> Iterable[tuple[Res, dict]]:
        for (r, _, _), o in list(self.objects.items()):
            if not o.deleted and (r.group, r.version, r.plural) in self.registry:
                yield self.registry[(r.group, r.version, r.plural)], o.raw

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def emit(self, res: Res, etype: str, obj: dict, old: dict | None) -> None:
        rv = int(obj['metadata']['resourceVersion'])
        self.log.append((rv, res.key, etype, obj, old))
        while len(self.log) > self.log_limit:
            self.log_floor = self.log.popleft()[0]
        for w in self.watchers:
            if w.res.key == res.key:
                w.offer(etype, obj, old)

    def store(self, res: Res, obj: dict, old: dict | None, etype: str, mirror: bool = True) -> None:
        meta = obj['metadata']
        k = self.key(res, meta.get('namespace'), meta['name'])
        if etype == 'DELETED':
            self.objects[k].delete()
            for ak in [ak for ak in self.applied if ak[:3] == (res.key, k[1], k[2])]:
                del self.applied[ak]
        elif k in self.objects:
            self.objects[k].history.append(obj)
            if len(self.objects[k].history) > self.history_limit:
                del self.objects[k].history[:-self.history_limit]
        else:
            self.objects[k] = obj
        self.emit(res, etype, obj, old)
        if mirror and res.plural == 'events' and res.key in EVENT_TWINS:
            twin = self.registry.get(EVENT_TWINS[res.key])
            if twin is not None:
                self.store(twin, convert_event(obj, twin), convert_event(old, twin) if old else None, etype, mirror=False)
        if res.crd is None and res.plural == 'customresourcedefinitions':
            if etype == 'DELETED':
                self.unregister_crd(obj)
            else:
                self.register_crd(obj)

    def unregister_crd(self, crd: dict) -> None:
        for res in [r for r in self.registry.values() if r.crd == crd['metadata']['name']]:
            for obj in self.iter_objs(res):
                gone = copy.deepcopy(obj)
                gone['metadata']['resourceVersion'] = self.next_rv()
                self.store(res, gone, obj, 'DELETED')
            del self.registry[res.key]
            if res.kmock_resource in self.resources:
                del self.resources[res.kmock_resource]

    # ---------------- write paths ----------------

    def _normalize(self, res: Res, obj: dict, ns: str | None, validation: str, warnings: list[str]) -> dict:
        if not isinstance(obj, dict):
            raise ApiError(400, 'the body of the request was not a JSON object')
        if obj.get('kind') and obj['kind'] != res.kind:
            raise ApiError(400, f'the kind of the object ({obj["kind"]}) does not match the resource ({res.kind})')
        if obj.get('apiVersion') and obj['apiVersion'] != res.api_version:
            raise ApiError(400, f'the API version of the object ({obj["apiVersion"]}) does not match {res.api_version}')
        obj['apiVersion'], obj['kind'] = res.api_version, res.kind
        meta = obj.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise ApiError(400, 'metadata must be an object')
        if res.namespaced:
            if meta.get('namespace') and ns and meta['namespace'] != ns:
                raise ApiError(400, 'the namespace of the provided object does not match the namespace sent on the request')
            meta['namespace'] = ns or meta.get('namespace') or 'default'
        else:
            meta.pop('namespace', None)
        for key in ('labels', 'annotations'):
            if key in meta and meta[key] is None:
                del meta[key]
        if res.group == '' and res.plural == 'secrets' and isinstance(obj.get('stringData'), dict):
            data = dict(obj.get('data') or {})
            for k, v in obj.pop('stringData').items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj['data'] = data
        if res.schema:
            unknown: list[str] = []
            for key in [k for k in obj if k not in ('apiVersion', 'kind', 'metadata')]:
                props = res.schema.get('properties', {})
                if key not in props and not res.schema.get('x-kubernetes-preserve-unknown-fields'):
                    unknown.append(key)
                    del obj[key]
                elif key in props:
                    obj[key] = prune_and_default(props[key], obj[key], key, unknown)
            for key, sub in (res.schema.get('properties') or {}).items():
                if key not in obj and key not in ('apiVersion', 'kind', 'metadata') and isinstance(sub, dict) and 'default' in sub:
                    obj[key] = prune_and_default(sub, copy.deepcopy(sub['default']), key, [])
            if unknown:
                if validation == 'Strict':
                    raise ApiError(400, 'strict decoding error: ' + ', '.join(f'unknown field "{u}"' for u in unknown))
                if validation != 'Ignore':
                    warnings += [f'unknown field "{u}"' for u in unknown]
        return obj

    def _check_ns(self, res: Res, ns: str | None, creating: bool) -> None:
        if not res.namespaced:
            return
        nsobj = self.get_obj(self.registry[('', 'v1', 'namespaces')], None, ns or '')
        if nsobj is None:
            raise ApiError(404, f'namespaces "{ns}" not found', details={'name': ns, 'kind': 'namespaces'})
        if creating and nsobj['metadata'].get('deletionTimestamp'):
            raise ApiError(403, f'{res.kind.lower()} is forbidden: unable to create new content in namespace {ns} '
                                f'because it is being terminated', details={'name': ns, 'kind': 'namespaces'})

    def not_found(self, res: Res, name: str) -> ApiError:
        return ApiError(404, f'{res.group_resource} "{name}" not found',
                        details={'name': name, 'group': res.group, 'kind': res.plural})

    def conflict(self, res: Res, name: str) -> ApiError:
        return ApiError(409, f'Operation cannot be fulfilled on {res.group_resource} "{name}": the object has been '
                             f'modified; please apply your changes to the latest version and try again',
                        reason='Conflict', details={'name': name, 'group': res.group, 'kind': res.plural})

    def create(self, res: Res, ns: str | None, body: Any, q: dict, warnings: list[str] | None = None) -> dict:
        warnings = [] if warnings is None else warnings
        obj = self._normalize(res, copy.deepcopy(body), ns, q.get('fieldValidation', 'Warn'), warnings)
        meta = obj['metadata']
        if meta.get('resourceVersion'):
            raise ApiError(400, 'resourceVersion should not be set on objects to be created')
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
        name = meta.get('name')
        if not name:
            raise ApiError(422, f'{res.kind} "" is invalid: metadata.name: Required value: name or generateName is required')
        if not NAME_RE.match(name) or len(name) > 253:
            raise ApiError(422, f'{res.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase '
                                f'RFC 1123 subdomain must consist of lower case alphanumeric characters, \'-\' or \'.\'',
                           details={'name': name, 'group': res.group, 'kind': res.kind})
        self._check_ns(res, meta.get('namespace'), creating=True)
        if self.get_obj(res, meta.get('namespace'), name) is not None:
            raise ApiError(409, f'{res.group_resource} "{name}" already exists', reason='AlreadyExists',
                           details={'name': name, 'group': res.group, 'kind': res.plural})
        for k in ('deletionTimestamp', 'deletionGracePeriodSeconds', 'managedFields', 'selfLink'):
            meta.pop(k, None)
        if res.status:
            obj.pop('status', None)
        if res.group == '' and res.plural == 'namespaces':
            obj['spec'] = {'finalizers': ['kubernetes']}
            obj['status'] = {'phase': 'Active'}
        if res.plural == 'customresourcedefinitions' and res.group == 'apiextensions.k8s.io':
            obj['status'] = self.crd_status(obj)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_ts()
        if res.has_generation:
            meta['generation'] = 1
        if q.get('dryRun') == 'All':
            meta['resourceVersion'] = str(self.rv)
            return obj
        meta['resourceVersion'] = self.next_rv()
        self.store(res, obj, None, 'ADDED')
        return obj

    def update(self, res: Res, old: dict, new: dict, sub: str | None, q: dict, warnings: list[str],
               *, internal: bool = False) -> tuple[int, dict]:
        """Common tail of PUT/PATCH/internal writes: keeps system fields, separates status, bumps
        generation/resourceVersion, skips no-ops, finishes deletion when finalizers are gone."""
        name = old['metadata']['name']
        ns = old['metadata'].get('namespace')
        new = copy.deepcopy(new)  # patches share unchanged subtrees with the stored object
        if sub == 'status':
            merged = copy.deepcopy(old)
            if 'status' in new:
                merged['status'] = new['status']
            else:
                merged.pop('status', None)
            new = merged
        new = self._normalize(res, new, ns, q.get('fieldValidation', 'Warn'), warnings)
        meta, ometa = new['metadata'], old['metadata']
        if meta.get('name') != name:
            raise ApiError(400, f'the name of the object ({meta.get("name")}) does not match the name on the URL ({name})')
        for k in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'generation'):
            if not internal or k not in ('deletionTimestamp', 'deletionGracePeriodSeconds'):
                if k in ometa:
                    meta[k] = ometa[k]
                else:
                    meta.pop(k, None)
        meta.pop('managedFields', None)
        if res.status and sub != 'status':
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
            else:
                new.pop('status', None)
        if res.plural == 'customresourcedefinitions' and res.group == 'apiextensions.k8s.io' and sub != 'status':
            new['status'] = self.crd_status(new)
            if old.get('status', {}).get('conditions'):
                new['status']['conditions'] = old['status']['conditions']
        if ometa.get('deletionTimestamp') and not internal:
            added = set(meta.get('finalizers') or []) - set(ometa.get('finalizers') or [])
            if added:
                raise ApiError(422, f'{res.kind} "{name}" is invalid: metadata.finalizers: Forbidden: no new finalizers '
                                    f'can be added if the object is being deleted, found new finalizers {sorted(added)!r}',
                               details={'name': name, 'group': res.group, 'kind': res.kind})
        if 'finalizers' in meta and not meta['finalizers']:
            del meta['finalizers']

        def body_of(o: dict) -> dict:
            return {k: v for k, v in o.items() if k not in ('metadata', 'apiVersion', 'kind') and not (res.status and k == 'status')}

        def comparable(o: dict) -> dict:
            c = dict(o)
            c['metadata'] = {k: v for k, v in o['metadata'].items() if k not in ('resourceVersion', 'managedFields')}
            return c

        if res.has_generation and body_of(new) != body_of(old):
            meta['generation'] = int(ometa.get('generation') or 1) + 1
        if comparable(new) == comparable(old):
            return 200, old  # no-op: no new resourceVersion, no watch event
        if q.get('dryRun') == 'All':
            meta['resourceVersion'] = ometa.get('resourceVersion')
            return 200, new
        meta['resourceVersion'] = self.next_rv()
        if meta.get('deletionTimestamp') and not meta.get('finalizers') and res.key != ('', 'v1', 'namespaces'):
            self.store(res, new, old, 'MODIFIED')
            self.hard_delete(res, new, 'Background')
            return 200, new
        self.store(res, new, old, 'MODIFIED')
        self.gc()
        return 200, new

    def replace(self, res: Res, ns: str | None, name: str, sub: str | None, body: Any, q: dict, warnings: list[str]) -> tuple[int, dict]:
        old = self.get_obj(res, ns, name)
        if old is None:
            raise self.not_found(res, name)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body of the request was not a JSON object')
        want = (body.get('metadata') or {}).get('resourceVersion')
        if want and want != old['metadata']['resourceVersion']:
            raise self.conflict(res, name)
        new = copy.deepcopy(body)
        return self.update(res, old, new, sub, q, warnings)

    def patch(self, res: Res, ns: str | None, name: str, sub: str | None, ctype: str, raw: bytes, q: dict,
              warnings: list[str]) -> tuple[int, dict]:
        old = self.get_obj(res, ns, name)
        try:
            patch = json.loads(raw) if ctype != 'application/apply-patch+yaml' else yaml.safe_load(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise ApiError(400, f'error decoding patch: {e}')
        if ctype == 'application/apply-patch+yaml':
            return self.apply(res, ns, name, sub, old, patch, q, warnings)
        if old is None:
            raise self.not_found(res, name)
        if ctype == 'application/json-patch+json':
            if not isinstance(patch, list):
                raise ApiError(400, 'json patch must be a list of operations')
            try:
                new = json_patch(copy.deepcopy(old), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError, IndexError) as e:
                raise ApiError(422, f'the server rejected our request due to an error in our request: {e}', reason='Invalid')
            if (new.get('metadata') or {}).get('resourceVersion') != old['metadata']['resourceVersion']:
                raise self.conflict(res, name)
        elif ctype in ('application/merge-patch+json', 'application/strategic-merge-patch+json'):
            if not isinstance(patch, dict):
                raise ApiError(400, 'merge patch must be a JSON object')
            want = (patch.get('metadata') or {}).get('resourceVersion')
            if want and want != old['metadata']['resourceVersion']:
                raise self.conflict(res, name)
            if ctype == 'application/strategic-merge-patch+json':
                if res.crd is not None:
                    raise ApiError(415, 'the body of the request was in an unknown format - accepted media types '
                                        'include: application/json-patch+json, application/merge-patch+json, '
                                        'application/apply-patch+yaml')
                new = strategic_merge(old, patch)
            else:
                new = merge_patch(old, patch)
        else:
            raise ApiError(415, 'the body of the request was in an unknown format - accepted media types include: '
                                'application/json-patch+json, application/merge-patch+json, '
                                'application/apply-patch+yaml, application/strategic-merge-patch+json')
        return self.update(res, old, new, sub, q, warnings)

    def apply(self, res: Res, ns: str | None, name: str, sub: str | None, old: dict | None, cfg: Any, q: dict,
              warnings: list[str]) -> tuple[int, dict]:
        """Server-side apply, approximated: creates when absent; otherwise merges the applied
        configuration (merge keys for built-ins, lists replaced for CRs) and removes fields that
        the same fieldManager applied last time but omits now.  No managedFields, no conflicts."""
        manager = q.get('fieldManager')
        if not manager:
            raise ApiError(422, 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                                'is required for apply patch')
        if not isinstance(cfg, dict) or not cfg.get('apiVersion') or not cfg.get('kind'):
            raise ApiError(400, 'apply patches must contain apiVersion and kind')
        if (cfg.get('metadata') or {}).get('name') not in (None, name):
            raise ApiError(400, f'the name of the object ({cfg["metadata"]["name"]}) does not match the name on the URL ({name})')
        akey = (res.key, ns if res.namespaced else None, name, manager, sub)
        if old is None:
            if sub:
                raise self.not_found(res, name)
            body = copy.deepcopy(cfg)
            body.setdefault('metadata', {})['name'] = name
            created = self.create(res, ns, body, q, warnings)
            if q.get('dryRun') != 'All':
                self.applied[akey] = copy.deepcopy(cfg)
            return 201, created
        want = (cfg.get('metadata') or {}).get('resourceVersion')
        if want and want != old['metadata']['resourceVersion']:
            raise self.conflict(res, name)
        cfg_clean = copy.deepcopy(cfg)
        (cfg_clean.get('metadata') or {}).pop('resourceVersion', None)
        new = strategic_merge(old, cfg_clean, directives=False) if res.crd is None else merge_patch(old, cfg_clean)
        new = copy.deepcopy(new)  # the merge shares untouched subtrees with the stored object
        for path in removed_paths(self.applied.get(akey, {}), cfg_clean):
            if path[0] in ('apiVersion', 'kind') or path[:2] in (('metadata', 'name'), ('metadata', 'namespace')):
                continue
            cur = new
            for p in path[:-1]:
                cur = cur.get(p) if isinstance(cur, dict) else None
            if isinstance(cur, dict):
                cur.pop(path[-1], None)
        code, result = self.update(res, old, new, sub, q, warnings)
        if q.get('dryRun') != 'All':
            self.applied[akey] = cfg_clean
        return code, result

    def delete(self, res: Res, ns: str | None, name: str, opts: dict, q: dict) -> tuple[int, dict]:
        old = self.get_obj(res, ns, name)
        if old is None:
            raise self.not_found(res, name)
        pre = opts.get('preconditions') or {}
        if pre.get('uid') and pre['uid'] != old['metadata'].get('uid'):
            raise ApiError(409, f'Precondition failed: UID in precondition: {pre["uid"]}, UID in object meta: '
                                f'{old["metadata"].get("uid")}', reason='Conflict',
                           details={'name': name, 'group': res.group, 'kind': res.plural})
        if pre.get('resourceVersion') and pre['resourceVersion'] != old['metadata'].get('resourceVersion'):
            raise self.conflict(res, name)
        policy = opts.get('propagationPolicy') or q.get('propagationPolicy')
        if not policy:
            orphan = opts.get('orphanDependents')
            policy = 'Orphan' if orphan is True or (orphan is None and res.key in ORPHAN_BY_DEFAULT) else 'Background'
        if policy not in ('Orphan', 'Background', 'Foreground'):
            raise ApiError(422, f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: "{policy}"')
        if old['metadata'].get('deletionTimestamp'):
            return 202, old
        dry = q.get('dryRun') == 'All' or opts.get('dryRun') == ['All']
        finalizers = list(old['metadata'].get('finalizers') or [])
        is_ns = res.group == '' and res.plural == 'namespaces'
        if finalizers or policy == 'Foreground' or is_ns:
            new = copy.deepcopy(old)
            meta = new['metadata']
            meta['deletionTimestamp'] = now_ts()
            meta['deletionGracePeriodSeconds'] = 0
            if policy == 'Foreground' and 'foregroundDeletion' not in finalizers:
                meta['finalizers'] = finalizers + ['foregroundDeletion']
            if is_ns:
                new.setdefault('status', {})['phase'] = 'Terminating'
            if dry:
                return 202, new
            if res.has_generation:
                meta['generation'] = int(meta.get('generation') or 1) + 1
            meta['resourceVersion'] = self.next_rv()
            self.store(res, new, old, 'MODIFIED')
            if policy == 'Orphan':
                self.orphan(old)
            elif policy == 'Foreground':
                self.delete_dependents(old)
            if is_ns:
                for r, obj in list(self.all_live()):
                    if r.namespaced and obj['metadata'].get('namespace') == name \
                            and self.get_obj(r, name, obj['metadata']['name']) is not None:  # not cascaded away meanwhile
                        try:
                            self.delete(r, name, obj['metadata']['name'], {'propagationPolicy': 'Background'}, {})
                        except ApiError:
                            pass
            self.gc()
            cur = self.get_obj(res, ns, name)
            return (202, cur) if cur is not None else (200, new)
        if dry:
            return 200, old
        gone = self.hard_delete(res, old, policy)
        return 200, gone

    def hard_delete(self, res: Res, obj: dict, policy: str) -> dict:
        gone = copy.deepcopy(obj)
        gone['metadata']['resourceVersion'] = self.next_rv()
        self.store(res, gone, obj, 'DELETED')
        if policy == 'Orphan':
            self.orphan(obj)
        else:
            self.delete_dependents(obj)
        self.gc()
        return gone

    def dependents(self, owner: dict) -> list[tuple[Res, dict]]:
        uid = owner['metadata'].get('uid')
        return [(r, o) for r, o in self.all_live()
                if any(ref.get('uid') == uid for ref in o['metadata'].get('ownerReferences') or [])]

    def delete_dependents(self, owner: dict) -> None:
        for r, o in self.dependents(owner):
            if self.get_obj(r, o['metadata'].get('namespace'), o['metadata']['name']) is not None:
                try:
                    self.delete(r, o['metadata'].get('namespace'), o['metadata']['name'], {'propagationPolicy': 'Background'}, {})
                except ApiError:
                    pass

    def orphan(self, owner: dict) -> None:
        uid = owner['metadata'].get('uid')
        for r, o in self.dependents(owner):
            new = copy.deepcopy(o)
            refs = [ref for ref in new['metadata']['ownerReferences'] if ref.get('uid') != uid]
            if refs:
                new['metadata']['ownerReferences'] = refs
            else:
                del new['metadata']['ownerReferences']
            self.update(r, o, new, None, {}, [], internal=True)

    def gc(self) -> None:
        """Finishes foreground deletions whose dependents are gone, and terminating namespaces."""
        if self.in_gc:  # writes below call gc() again; the outer loop re-scans anyway
            return
        self.in_gc = True
        try:
            self._gc()
        finally:
            self.in_gc = False

    def _gc(self) -> None:
        changed = True
        while changed:
            changed = False
            for r, o in list(self.all_live()):
                if not o['metadata'].get('deletionTimestamp'):
                    continue
                o = self.get_obj(r, o['metadata'].get('namespace'), o['metadata']['name'])  # may have changed
                if o is None:
                    continue
                meta = o['metadata']
                if 'foregroundDeletion' in (meta.get('finalizers') or []) and not self.dependents(o):
                    new = copy.deepcopy(o)
                    new['metadata']['finalizers'] = [f for f in meta['finalizers'] if f != 'foregroundDeletion']
                    self.update(r, o, new, None, {}, [], internal=True)
                    changed = True
                elif r.group == '' and r.plural == 'namespaces' and self.get_obj(r, None, meta['name']) is not None:
                    if not any(rr.namespaced and oo['metadata'].get('namespace') == meta['name'] for rr, oo in self.all_live()):
                        self.hard_delete(r, o, 'Background')
                        changed = True

    # ---------------- read paths ----------------

    def list_objs(self, res: Res, ns: str | None, q: dict) -> list[dict]:
        labels = parse_label_selector(q.get('labelSelector'))
        fields = parse_field_selector(q.get('fieldSelector'), res)
        objs = [o for o in self.iter_objs(res, ns)
                if labels_match(labels, o['metadata'].get('labels') or {}) and fields_match(fields, o)]
        objs.sort(key=lambda o: (o['metadata'].get('namespace') or '', o['metadata']['name']))
        return objs

    def table(self, res: Res, objs: list[dict], q: dict, list_meta: dict | None = None) -> dict:
        if res.columns:
            cols = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                     'description': 'Name must be unique within a namespace.'}]
            cols += [{'name': c['name'], 'type': c.get('type', 'string'), 'format': c.get('format', ''),
                      'description': c.get('description', ''), 'priority': c.get('priority', 0)} for c in res.columns]
        else:
            cols = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                     'description': 'Name must be unique within a namespace.'},
                    {'name': 'Age', 'type': 'string', 'format': '', 'priority': 0,
                     'description': 'CreationTimestamp is a timestamp representing the server time when this object was created.'}]
        include = q.get('includeObject', 'Metadata')
        rows = []
        for o in objs:
            cells: list[Any] = [o['metadata']['name']]
            if res.columns:
                for c in res.columns:
                    v = jsonpath(o, c['jsonPath'])
                    if c.get('type') == 'date':
                        v = age_of(v)
                    elif isinstance(v, (dict, list)):
                        v = json.dumps(v)
                    cells.append(v)
            else:
                cells.append(age_of(o['metadata'].get('creationTimestamp')))
            row: dict = {'cells': cells}
            if include == 'Object':
                row['object'] = o
            elif include != 'None':
                row['object'] = partial_metadata(o)
            rows.append(row)
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': list_meta or {'resourceVersion': str(self.rv)},
                'columnDefinitions': cols, 'rows': rows}

    # ---------------- discovery & openapi ----------------

    def resource_list(self, group: str, version: str) -> dict:
        resources = []
        for res in sorted((r for r in self.registry.values() if r.group == group and r.version == version), key=lambda r: r.plural):
            resources.append({'name': res.plural, 'singularName': res.singular, 'namespaced': res.namespaced,
                              'kind': res.kind, 'verbs': res.verbs, **({'shortNames': res.short} if res.short else {}),
                              **({'categories': res.categories} if res.categories else {})})
            if res.status:
                resources.append({'name': f'{res.plural}/status', 'singularName': '', 'namespaced': res.namespaced,
                                  'kind': res.kind, 'verbs': ['get', 'patch', 'update']})
        return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': resources}

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.registry.values():
            if r.group:
                out.setdefault(r.group, [])
                if r.version not in out[r.group]:
                    out[r.group].append(r.version)
        for g in out:
            out[g].sort(key=_version_priority)
        return out

    def api_group(self, group: str, versions: list[str]) -> dict:
        return {'kind': 'APIGroup', 'apiVersion': 'v1', 'name': group,
                'versions': [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions],
                'preferredVersion': {'groupVersion': f'{group}/{versions[0]}', 'version': versions[0]}}

    def openapi_v3_index(self) -> dict:
        paths = {'api/v1': {'serverRelativeURL': '/openapi/v3/api/v1?hash=kmock'}}
        for g, vs in self.groups().items():
            for v in vs:
                paths[f'apis/{g}/{v}'] = {'serverRelativeURL': f'/openapi/v3/apis/{g}/{v}?hash=kmock'}
        return {'paths': paths}

    def openapi_v3_gv(self, group: str, version: str) -> dict:
        """A minimal OpenAPI v3 document: object schemas of our CRDs (others: open objects), and
        paths that declare the fieldValidation/dryRun parameters, so that kubectl delegates
        validation to this server instead of validating client-side."""
        schemas: dict[str, Any] = {}
        paths: dict[str, Any] = {}
        params = [{'name': n, 'in': 'query', 'schema': {'type': 'string'}} for n in ('dryRun', 'fieldManager', 'fieldValidation')]
        for res in (r for r in self.registry.values() if r.group == group and r.version == version):
            gvk = {'group': res.group, 'version': res.version, 'kind': res.kind}
            name = f'{res.group or "io.k8s.api.core"}.{res.version}.{res.kind}'
            schema = copy.deepcopy(res.schema) if res.schema else {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}
            schema.setdefault('properties', {})
            schema['properties'].setdefault('apiVersion', {'type': 'string'})
            schema['properties'].setdefault('kind', {'type': 'string'})
            schema['properties']['metadata'] = {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}
            schema['x-kubernetes-group-version-kind'] = [gvk]
            schemas[name] = schema
            base = f'/apis/{group}/{version}' if group else f'/api/{version}'
            coll = f'{base}/namespaces/{{namespace}}/{res.plural}' if res.namespaced else f'{base}/{res.plural}'
            ref = {'content': {'application/json': {'schema': {'$ref': f'#/components/schemas/{name}'}}}}
            op = lambda verb: {'x-kubernetes-action': verb, 'x-kubernetes-group-version-kind': gvk,
                               'parameters': params, 'responses': {'200': {'description': 'OK', **ref}}}
            paths[coll] = {'post': {**op('post'), 'requestBody': ref}, 'get': op('list')}
            paths[f'{coll}/{{name}}'] = {'get': op('get'), 'put': {**op('put'), 'requestBody': ref},
                                         'patch': op('patch'), 'delete': op('delete')}
        return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes (kmock)', 'version': SERVER_VERSION['gitVersion']},
                'paths': paths, 'components': {'schemas': schemas}}

    # ---------------- HTTP ----------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        start = time.monotonic()
        status = 0
        try:
            resp = await self.dispatch(raw)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.code
            return aiohttp.web.json_response(e.body(), status=e.code)
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as e:  # a bug here: report it as a 500 Status and on stderr
            status = 500
            traceback.print_exc(file=sys.stderr)
            return aiohttp.web.json_response(ApiError(500, f'kmock apiserver error: {e!r}').body(), status=500)
        finally:
            if LOG and not (status == 200 and raw.query.get('watch') in ('true', '1')):  # watches log when opened
                LOG(f'{raw.method} {raw.path_qs} {status} {(time.monotonic() - start) * 1000:.1f}ms '
                    f'ua={json.dumps(raw.headers.get("User-Agent", ""))}')

    async def dispatch(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        q = dict(raw.query)
        segs = [s for s in raw.path.split('/') if s]
        method = raw.method
        ok = lambda data, code=200, headers=None: aiohttp.web.json_response(data, status=code, headers=headers)
        if method == 'GET':
            if not segs:
                paths = ['/api', '/api/v1', '/apis', '/healthz', '/livez', '/openapi/v2', '/openapi/v3', '/readyz', '/version']
                for g, vs in self.groups().items():
                    paths += [f'/apis/{g}'] + [f'/apis/{g}/{v}' for v in vs]
                return ok({'paths': sorted(paths)})
            if segs == ['version']:
                return ok(SERVER_VERSION)
            if segs[0] in ('healthz', 'livez', 'readyz'):
                return aiohttp.web.Response(text='ok')
            if segs == ['api']:
                return ok({'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': [
                    {'clientCIDR': '0.0.0.0/0', 'serverAddress': self.address}]})
            if segs == ['apis']:
                return ok({'kind': 'APIGroupList', 'apiVersion': 'v1',
                           'groups': [self.api_group(g, vs) for g, vs in sorted(self.groups().items())]})
            if segs == ['api', 'v1']:
                return ok(self.resource_list('', 'v1'))
            if len(segs) == 2 and segs[0] == 'apis':
                vs = self.groups().get(segs[1])
                if not vs:
                    raise ApiError(404, 'the server could not find the requested resource')
                return ok(self.api_group(segs[1], vs))
            if len(segs) == 3 and segs[0] == 'apis':
                if segs[2] not in self.groups().get(segs[1], []):
                    raise ApiError(404, 'the server could not find the requested resource')
                return ok(self.resource_list(segs[1], segs[2]))
            if segs[0] == 'openapi':
                if not self.serve_openapi:
                    raise ApiError(404, 'the server could not find the requested resource')
                if segs == ['openapi', 'v3']:
                    return ok(self.openapi_v3_index())
                if segs[:2] == ['openapi', 'v3'] and segs[2:4] == ['api', 'v1'] and len(segs) == 4:
                    return ok(self.openapi_v3_gv('', 'v1'))
                if segs[:3] == ['openapi', 'v3', 'apis'] and len(segs) == 5 and segs[4] in self.groups().get(segs[3], []):
                    return ok(self.openapi_v3_gv(segs[3], segs[4]))
                raise ApiError(404, 'the server could not find the requested resource')
        return await self.resource_request(raw, method, segs, q, body)

    def parse_resource_path(self, segs: list[str]) -> tuple[Res, str | None, str | None, str | None, bool]:
        if segs[:2] == ['api', 'v1']:
            group, version, rest = '', 'v1', segs[2:]
        elif segs[:1] == ['apis'] and len(segs) >= 3:
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise ApiError(404, 'the server could not find the requested resource')
        legacy_watch = False
        if rest[:1] == ['watch']:
            legacy_watch, rest = True, rest[1:]
        ns = None
        if len(rest) >= 3 and rest[0] == 'namespaces' and (group, version, rest[2]) in self.registry \
                and self.registry[(group, version, rest[2])].namespaced:
            ns, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in self.registry or len(rest) > 3:
            raise ApiError(404, 'the server could not find the requested resource')
        res = self.registry[(group, version, rest[0])]
        if res.namespaced is False and ns is not None:
            raise ApiError(404, 'the server could not find the requested resource')
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and not (sub == 'status' and res.status):
            raise ApiError(404, 'the server could not find the requested resource')
        return res, ns, name, sub, legacy_watch

    async def resource_request(self, raw, method: str, segs: list[str], q: dict, body: bytes) -> aiohttp.web.StreamResponse:
        res, ns, name, sub, legacy_watch = self.parse_resource_path(segs)
        accept = parse_accept(raw.headers.get('Accept', ''))
        warnings: list[str] = []

        def respond(data: dict, code: int = 200) -> aiohttp.web.Response:
            headers = {'Warning': ', '.join(f'299 - {json.dumps(w)}' for w in warnings)} if warnings else None
            if accept == 'Table' and data.get('kind') == res.kind:
                data = self.table(res, [data], q)
            elif accept == 'PartialObjectMetadata' and data.get('kind') == res.kind:
                data = partial_metadata(data)
            return aiohttp.web.json_response(data, status=code, headers=headers)

        def parse_body() -> Any:
            if not body:
                raise ApiError(400, 'the request body is empty')
            if 'protobuf' in raw.headers.get('Content-Type', '') or 'cbor' in raw.headers.get('Content-Type', ''):
                raise ApiError(415, 'the body of the request was in an unknown format - accepted media types '
                                    'include: application/json, application/yaml')
            try:
                return json.loads(body)
            except ValueError:
                try:
                    return yaml.safe_load(body)
                except yaml.YAMLError as e:
                    raise ApiError(400, f'could not decode the request body: {e}')

        if res.namespaced and name is not None and ns is None and not (method == 'GET' and (q.get('watch') in ('true', '1') or legacy_watch)):
            raise ApiError(404, 'the server could not find the requested resource')
        if method == 'GET' and (q.get('watch') in ('true', '1') or legacy_watch):
            return await self.watch(raw, res, ns, name, q, accept)
        if method == 'GET' and name is None:
            objs = self.list_objs(res, ns, q)
            meta: dict = {'resourceVersion': str(self.rv)}
            limit = int(q.get('limit') or 0)
            if q.get('continue'):
                try:
                    start = json.loads(base64.urlsafe_b64decode(q['continue'].encode()))['start']
                except Exception:
                    raise ApiError(400, 'invalid continue token')
                objs = [o for o in objs if [o['metadata'].get('namespace') or '', o['metadata']['name']] > start]
            if limit and len(objs) > limit:
                last = objs[limit - 1]['metadata']
                meta['continue'] = base64.urlsafe_b64encode(json.dumps(
                    {'start': [last.get('namespace') or '', last['name']]}).encode()).decode()
                meta['remainingItemCount'] = len(objs) - limit
                objs = objs[:limit]
            if accept == 'Table':
                return aiohttp.web.json_response(self.table(res, objs, q, meta))
            if accept in ('PartialObjectMetadata', 'PartialObjectMetadataList'):
                return aiohttp.web.json_response({'kind': 'PartialObjectMetadataList', 'apiVersion': 'meta.k8s.io/v1',
                                                  'metadata': meta, 'items': [partial_metadata(o) for o in objs]})
            return aiohttp.web.json_response({'kind': f'{res.kind}List', 'apiVersion': res.api_version,
                                              'metadata': meta, 'items': objs})
        if method == 'GET':
            obj = self.get_obj(res, ns, name)
            if obj is None:
                raise self.not_found(res, name)
            return respond(obj)
        if method == 'POST' and name is None:
            return respond(self.create(res, ns, parse_body(), q, warnings), 201)
        if method == 'PUT' and name is not None:
            code, obj = self.replace(res, ns, name, sub, parse_body(), q, warnings)
            return respond(obj, code)
        if method == 'PATCH' and name is not None:
            ctype = raw.headers.get('Content-Type', 'application/merge-patch+json').split(';')[0].strip()
            if not body:
                raise ApiError(400, 'the request body is empty')
            code, obj = self.patch(res, ns, name, sub, ctype, body, q, warnings)
            return respond(obj, code)
        if method == 'DELETE' and sub is None:
            opts = json.loads(body) if body.strip() else {}
            if not isinstance(opts, dict):
                raise ApiError(400, 'DeleteOptions must be an object')
            if 'gracePeriodSeconds' in q:
                opts.setdefault('gracePeriodSeconds', int(q['gracePeriodSeconds']))
            if name is not None:
                code, obj = self.delete(res, ns, name, opts, q)
                return respond(obj, code)
            deleted = []
            for obj in self.list_objs(res, ns, q):
                try:
                    deleted.append(self.delete(res, obj['metadata'].get('namespace'), obj['metadata']['name'], opts, q)[1])
                except ApiError:
                    pass
            return aiohttp.web.json_response({'kind': f'{res.kind}List', 'apiVersion': res.api_version,
                                              'metadata': {'resourceVersion': str(self.rv)}, 'items': deleted})
        raise ApiError(405, 'the server does not allow this method on the requested resource')

    async def watch(self, raw, res: Res, ns: str | None, name: str | None, q: dict, accept: str | None) -> aiohttp.web.StreamResponse:
        fields = parse_field_selector(q.get('fieldSelector'), res)
        w = Watcher(res, ns, name, parse_label_selector(q.get('labelSelector')), fields)
        rv_text = q.get('resourceVersion') or ''
        initial: list[tuple[str, dict]] = []
        bookmarks = q.get('allowWatchBookmarks') in ('true', '1')
        send_initial = q.get('sendInitialEvents') in ('true', '1')
        too_old = False
        # Everything up to `self.watchers.append` runs without awaiting: no event can slip through.
        if rv_text in ('', '0') or send_initial:
            objs = sorted((o for o in self.iter_objs(res, ns) if w.matches(o)), key=lambda o: int(o['metadata']['resourceVersion']))
            initial = [('ADDED', o) for o in objs]
        else:
            try:
                since = int(rv_text)
            except ValueError:
                raise ApiError(400, f'invalid resourceVersion {rv_text!r}')
            if since < self.log_floor:
                too_old = True
            else:
                for rv, key, etype, obj, old in self.log:
                    if rv > since and key == res.key:
                        w.offer(etype, obj, old)
        for item in initial:
            w.queue.put_nowait(item)
        if send_initial and bookmarks:
            w.queue.put_nowait(('BOOKMARK', {'kind': res.kind, 'apiVersion': res.api_version, 'metadata': {
                'resourceVersion': str(self.rv), 'annotations': {'k8s.io/initial-events-end': 'true'}}}))
        if not too_old:
            self.watchers.append(w)
        timeout = float(q.get('timeoutSeconds') or 1800)
        resp = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json', 'Cache-Control': 'no-cache, private'})
        resp.enable_chunked_encoding()
        if LOG:
            LOG(f'{raw.method} {raw.path_qs} 200 watch-open ua={json.dumps(raw.headers.get("User-Agent", ""))}')
        try:
            await resp.prepare(raw)
            if too_old:
                err = ApiError(410, f'too old resource version: {rv_text} ({self.log_floor + 1})', reason='Expired')
                await resp.write(json.dumps({'type': 'ERROR', 'object': err.body()}).encode() + b'\n')
                return resp
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            last_sent = loop.time()
            while not self.stopping.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    tick = min(remaining, 1.0, self.bookmark_interval if bookmarks else 1.0)
                    etype, obj = await asyncio.wait_for(w.queue.get(), max(tick, 0.01))
                except asyncio.TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        break
                    if bookmarks and loop.time() - last_sent >= self.bookmark_interval and w.queue.empty():
                        etype, obj = 'BOOKMARK', {'kind': res.kind, 'apiVersion': res.api_version,
                                                  'metadata': {'resourceVersion': str(self.rv)}}
                    else:
                        continue
                if etype == 'STOP':
                    break
                if accept == 'Table' and etype != 'BOOKMARK':
                    obj = self.table(res, [obj], q)
                elif accept in ('PartialObjectMetadata', 'PartialObjectMetadataList') and etype != 'BOOKMARK':
                    obj = partial_metadata(obj)
                await resp.write(json.dumps({'type': etype, 'object': obj}).encode() + b'\n')
                last_sent = loop.time()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if w in self.watchers:
                self.watchers.remove(w)
        try:
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass
        return resp

    def stop_watches(self) -> None:
        self.stopping.set()
        for w in self.watchers:
            w.queue.put_nowait(('STOP', {}))


def _version_priority(v: str) -> tuple:
    m = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', v)
    if not m:
        return (3, v)
    return ({None: 0, 'beta': 1, 'alpha': 2}[m[2]], -int(m[1]), -int(m[3] or 0))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def _stdin_is_watchable() -> bool:
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def amain(args: argparse.Namespace) -> int:
    emu = Apiserver()
    emu.bookmark_interval = args.bookmark_interval
    emu.serve_openapi = not args.no_openapi
    emu.log_limit = max(1, args.watch_cache_size)
    emu.register_builtins(everything=args.all_builtins)
    ns_res = emu.registry[('', 'v1', 'namespaces')]
    for ns in INITIAL_NAMESPACES:
        emu.create(ns_res, None, {'metadata': {'name': ns}}, {})
    crd_dirs = [Path(d) for d in (args.crds or [str(REPO / 'crds')])]
    for d in crd_dirs:
        if not d.is_dir():
            print(f'apiserver: no such CRD directory: {d}', file=sys.stderr)
            return 2
    n_crds = emu.load_crd_files(crd_dirs)
    if n_crds == 0 and not args.crds:
        print(f'apiserver: no CustomResourceDefinitions found in {crd_dirs[0]}', file=sys.stderr)
        return 2

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, done.set)
    if not args.ignore_stdin and _stdin_is_watchable():
        def wait_stdin() -> None:
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                pass
            loop.call_soon_threadsafe(done.set)
        threading.Thread(target=wait_stdin, name='stdin-eof', daemon=True).start()

    async with emu, kmock.Server(emu, host=args.host, port=args.port or None, user_agent='') as srv:
        emu.address = f'{args.host}:{srv.port}'
        sys.stdout.write(f'READY {srv.port}\n')
        sys.stdout.flush()
        await done.wait()
        threading.Timer(5.0, lambda: os._exit(0)).start()  # never hang on shutdown
        emu.stop_watches()
        await asyncio.sleep(0.05)
    return 0


def _log_line(line: str) -> None:
    sys.stderr.write(f'{datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]} {line}\n')
    sys.stderr.flush()


def main() -> None:
    global LOG
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--port', type=int, default=0, help='TCP port on --host; 0 picks a free one (default)')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--crds', action='append', metavar='DIR',
                   help='directory of CRD YAML files to install at start (repeatable; default: <repo>/crds)')
    p.add_argument('--all-builtins', action='store_true',
                   help="serve every built-in resource of kmock's bundled discovery data, not just the operator's")
    p.add_argument('--bookmark-interval', type=float, default=10.0, help='seconds between watch BOOKMARK events')
    p.add_argument('--watch-cache-size', type=int, default=10_000,
                   help='events kept for watch resumption; older resourceVersions get 410 Expired')
    p.add_argument('--ignore-stdin', action='store_true', help='do not exit when stdin reaches EOF')
    p.add_argument('--verbose', '-v', action='store_true', help='log one line per request to stderr')
    p.add_argument('--no-openapi', action='store_true', help='answer 404 on /openapi/* (to see what kubectl does then)')
    args = p.parse_args()
    if args.verbose:
        LOG = _log_line
    try:
        code = asyncio.run(amain(args))
    except KeyboardInterrupt:
        code = 0
    sys.stdout.flush()
    os._exit(code)  # don't wait for lingering connections / the stdin reader thread


if __name__ == '__main__':
    main()
