#!/usr/bin/env python3
"""Checks, over HTTP, the API behaviours that tests/kmock/README.md claims for apiserver.py.

    .venv-kmock/bin/python tests/kmock/api_check.py [-v]

Starts its own apiserver.py (piped stdin, --port 0), runs every check, then verifies that the
server exits on stdin EOF and (a second instance) on SIGTERM.  Ends with the line
"N passed, N failed"; exit status 1 when anything failed.  Standard library only (+ the venv).
"""
from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERBOSE = '-v' in sys.argv
WHC = '/apis/profilesync.dev/v1alpha1/namespaces/default/warehouseconnections'
PODS = '/api/v1/namespaces/default/pods'
CMS = '/api/v1/namespaces/default/configmaps'
RESULTS: list[tuple[str, bool, str]] = []


def start(*extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(HERE / 'apiserver.py'), '--port', '0', *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if VERBOSE else subprocess.DEVNULL,
                            text=True)
    line = proc.stdout.readline()
    if not line.startswith('READY '):
        raise SystemExit(f'apiserver did not print READY: {line!r}')
    return proc, int(line.split()[1])


class Client:
    def __init__(self, port: int):
        self.port = port

    def req(self, method: str, path: str, body=None, ctype='application/json', headers=None):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        hdrs = {'Content-Type': ctype, **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(raw), dict(resp.getheaders())
        except ValueError:
            return resp.status, raw.decode(), dict(resp.getheaders())

    def get(self, path, **kw): return self.req('GET', path, **kw)[:2]
    def post(self, path, body, **kw): return self.req('POST', path, body, **kw)[:2]
    def put(self, path, body, **kw): return self.req('PUT', path, body, **kw)[:2]
    def delete(self, path, body=None, **kw): return self.req('DELETE', path, body, **kw)[:2]
    def merge(self, path, body): return self.req('PATCH', path, body, 'application/merge-patch+json')[:2]
    def jsonpatch(self, path, body): return self.req('PATCH', path, body, 'application/json-patch+json')[:2]
    def smp(self, path, body): return self.req('PATCH', path, body, 'application/strategic-merge-patch+json')[:2]
    def apply(self, path, body, manager='test'):
        sep = '&' if '?' in path else '?'
        return self.req('PATCH', f'{path}{sep}fieldManager={manager}' if manager else path, body, 'application/apply-patch+yaml')[:2]

    def watch(self, path: str) -> 'Watch':
        return Watch(self.port, path)


class Watch:
    """Reads a watch stream in a thread; events() returns what arrived within `wait` seconds."""

    def __init__(self, port: int, path: str):
        self.q: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        self.conn.request('GET', path)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                self.q.put(json.loads(line))
        except Exception:
            pass
        self.closed.set()

    def events(self, wait: float = 0.5) -> list[tuple[str, dict]]:
        out, deadline = [], time.monotonic() + wait
        while True:
            try:
                ev = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                out.append((ev['type'], ev['object']))
            except queue.Empty:
                return out

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(2)
        except Exception:
            pass
        self.conn.close()


def check(name: str):
    def deco(fn):
        try:
            fn()
            RESULTS.append((name, True, ''))
            print(f'ok   {name}')
        except Exception as e:
            RESULTS.append((name, False, repr(e)))
            print(f'FAIL {name}: {e!r}')
            if VERBOSE:
                traceback.print_exc()
        return fn
    return deco


def eq(a, b, what=''):
    if a != b:
        raise AssertionError(f'{what}: {a!r} != {b!r}')


def whc(name: str, labels=None, **spec) -> dict:
    return {'apiVersion': 'profilesync.dev/v1alpha1', 'kind': 'WarehouseConnection',
            'metadata': {'name': name, **({'labels': labels} if labels else {})},
            'spec': {'schedule': '1h', 'warehouse': {'type': 'sqlite', 'sqlite': {'path': '/tmp/x.db'}}, **spec}}


def main() -> int:
    proc, port = start('--bookmark-interval', '0.3', '--watch-cache-size', '200')
    c = Client(port)

    @check('discovery: /api/v1 reports groupVersion v1 and the core kinds')
    def _():
        code, body = c.get('/api/v1')
        eq(code, 200)
        eq(body['groupVersion'], 'v1')
        names = {r['name'] for r in body['resources']}
        assert {'namespaces', 'secrets', 'configmaps', 'pods', 'events', 'serviceaccounts', 'services', 'pods/status'} <= names, names

    @check('discovery: /apis and /apis/profilesync.dev/v1alpha1 (shortNames, categories, status)')
    def _():
        code, body = c.get('/apis')
        groups = {g['name']: g for g in body['groups']}
        for g in ('batch', 'coordination.k8s.io', 'events.k8s.io', 'apps', 'rbac.authorization.k8s.io',
                  'apiextensions.k8s.io', 'policy', 'networking.k8s.io', 'profilesync.dev'):
            assert g in groups, g
        eq(groups['profilesync.dev']['preferredVersion']['version'], 'v1alpha1')
        code, body = c.get('/apis/profilesync.dev/v1alpha1')
        res = {r['name']: r for r in body['resources']}
        eq(res['warehouseconnections']['shortNames'], ['whc'])
        eq(res['selectivesyncs']['shortNames'], ['ssync'])
        eq(res['warehouseconnections']['categories'], ['profilesync'])
        eq(res['warehouseconnections']['namespaced'], True)
        eq(res['warehouseconnections']['kind'], 'WarehouseConnection')
        assert 'warehouseconnections/status' in res and 'selectivesyncs/status' in res
        assert 'watch' in res['warehouseconnections']['verbs']

    @check('create stamps uid, creationTimestamp, generation=1, resourceVersion; 201')
    def _():
        code, o = c.post(WHC, whc('a', labels={'tier': 'gold'}))
        eq(code, 201)
        m = o['metadata']
        assert m['uid'] and m['creationTimestamp'].endswith('Z') and m['resourceVersion'].isdigit(), m
        eq(m['generation'], 1)
        eq(m['namespace'], 'default')

    @check('create: 409 AlreadyExists; 404 for a missing namespace; 422 for a bad name; generateName')
    def _():
        code, o = c.post(WHC, whc('a'))
        eq((code, o['reason']), (409, 'AlreadyExists'))
        code, o = c.post(WHC.replace('/default/', '/nope/'), whc('x'))
        eq((code, o['reason']), (404, 'NotFound'))
        code, o = c.post(WHC, whc('Bad_Name'))
        eq(code, 422)
        body = whc('')
        body['metadata'] = {'generateName': 'gen-'}
        code, o = c.post(WHC, body)
        eq(code, 201)
        assert o['metadata']['name'].startswith('gen-') and len(o['metadata']['name']) == 9

    @check('CRD schema: defaults applied, unknown fields pruned (Warn header) or rejected (Strict)')
    def _():
        code, o, h = c.req('POST', WHC, {**whc('d'), 'spec': {**whc('d')['spec'], 'bogus': 1}})
        eq(code, 201)
        eq(o['spec'].get('suspend'), False, 'default')
        assert 'bogus' not in o['spec']
        assert h.get('Warning', '').startswith('299 - ') and 'unknown field \\"spec.bogus\\"' in h['Warning'], h
        code, o = c.post(WHC + '?fieldValidation=Strict', {**whc('e'), 'spec': {**whc('e')['spec'], 'bogus': 1}})
        eq(code, 400)

    @check('resourceVersion is monotonic across writes; list carries the current one')
    def _():
        _, a = c.get(WHC + '/a')
        _, b = c.merge(WHC + '/a', {'metadata': {'annotations': {'x': '1'}}})
        assert int(b['metadata']['resourceVersion']) > int(a['metadata']['resourceVersion'])
        _, lst = c.get(WHC)
        eq(lst['kind'], 'WarehouseConnectionList')
        assert int(lst['metadata']['resourceVersion']) >= int(b['metadata']['resourceVersion'])

    @check('generation: +1 on spec change, unchanged on metadata-only change and on /status writes')
    def _():
        _, o = c.get(WHC + '/a')
        g = o['metadata']['generation']
        _, o = c.merge(WHC + '/a', {'metadata': {'labels': {'tier': 'gold', 'more': 'x'}}})
        eq(o['metadata']['generation'], g)
        _, o = c.merge(WHC + '/a', {'spec': {'schedule': '2h'}})
        eq(o['metadata']['generation'], g + 1)
        _, o = c.merge(WHC + '/a/status', {'status': {'observedGeneration': g + 1}})
        eq(o['metadata']['generation'], g + 1)

    @check('no-op writes keep the resourceVersion (and emit no watch event)')
    def _():
        _, o = c.get(WHC + '/a')
        w = c.watch(WHC + f'?watch=true&resourceVersion={o["metadata"]["resourceVersion"]}')
        _, p = c.merge(WHC + '/a', {'spec': {'schedule': o['spec']['schedule']}})
        eq(p['metadata']['resourceVersion'], o['metadata']['resourceVersion'])
        eq(w.events(0.4), [])
        w.close()

    @check('PUT: 409 on stale resourceVersion, 200 with current or no resourceVersion')
    def _():
        _, o = c.get(WHC + '/a')
        stale = json.loads(json.dumps(o))
        stale['metadata']['resourceVersion'] = '1'
        code, e = c.put(WHC + '/a', stale)
        eq((code, e['reason']), (409, 'Conflict'))
        o['spec']['schedule'] = '3h'
        code, p = c.put(WHC + '/a', o)
        eq((code, p['spec']['schedule']), (200, '3h'))
        del p['metadata']['resourceVersion']
        p['spec']['schedule'] = '4h'
        code, p = c.put(WHC + '/a', p)
        eq((code, p['spec']['schedule']), (200, '4h'))
        code, _ = c.put(WHC + '/nope', {**whc('nope')})
        eq(code, 404)

    @check('status subresource: /status writes change only status; main writes ignore status')
    def _():
        _, o = c.get(WHC + '/a')
        code, p = c.merge(WHC + '/a/status', {'spec': {'schedule': '9h'}, 'status': {'observedGeneration': 7}})
        eq(code, 200)
        eq(p['spec']['schedule'], o['spec']['schedule'])
        eq(p['status']['observedGeneration'], 7)
        _, p = c.merge(WHC + '/a', {'status': {'observedGeneration': 8}})
        eq(p['status']['observedGeneration'], 7)
        p['status'] = {'observedGeneration': 9}
        code, q = c.put(WHC + '/a/status', p)
        eq((code, q['status']['observedGeneration']), (200, 9))
        stale = json.loads(json.dumps(q))
        stale['metadata']['resourceVersion'] = '2'
        code, _ = c.put(WHC + '/a/status', stale)
        eq(code, 409)
        code, g = c.get(WHC + '/a/status')
        eq((code, g['status']['observedGeneration']), (200, 9))
        code, _ = c.post(WHC, {**whc('s'), 'status': {'observedGeneration': 5}})
        _, s = c.get(WHC + '/s')
        assert 'status' not in s, 'status on create must be dropped'

    @check('merge patch: RFC 7386 (null deletes, lists replace); 409 on stale metadata.resourceVersion')
    def _():
        _, o = c.merge(WHC + '/a', {'spec': {'backfill': {'events': '7d'}}})
        eq(o['spec']['backfill']['events'], '7d')
        _, o = c.merge(WHC + '/a', {'spec': {'backfill': None}})
        # `backfill` has a schema default, so a deleted backfill comes back defaulted (as on a real server).
        eq(o['spec']['backfill']['events'], '60d')
        code, e = c.merge(WHC + '/a', {'metadata': {'resourceVersion': '1'}, 'spec': {'schedule': '5h'}})
        eq(code, 409)

    @check('JSON patch: add/remove/test; failed test -> 422; changing resourceVersion -> 409')
    def _():
        # kube-runtime's finalizer helper: test-null on an absent path must pass (Go json-patch leniency)
        code, o = c.jsonpatch(WHC + '/a', [{'op': 'test', 'path': '/metadata/finalizers', 'value': None},
                                           {'op': 'add', 'path': '/metadata/finalizers', 'value': ['k/r']}])
        eq((code, o['metadata'].get('finalizers')), (200, ['k/r']))
        code, o = c.jsonpatch(WHC + '/a', [{'op': 'test', 'path': '/metadata/finalizers/0', 'value': 'k/r'},
                                           {'op': 'remove', 'path': '/metadata/finalizers/0'}])
        eq(code, 200)
        code, o = c.jsonpatch(WHC + '/a', [{'op': 'add', 'path': '/metadata/finalizers', 'value': ['x/y']}])
        eq((code, o['metadata']['finalizers']), (200, ['x/y']))
        code, o = c.jsonpatch(WHC + '/a', [{'op': 'test', 'path': '/metadata/finalizers', 'value': ['x/y']},
                                           {'op': 'remove', 'path': '/metadata/finalizers/0'}])
        eq(code, 200)
        assert 'finalizers' not in o['metadata'], o['metadata']
        code, e = c.jsonpatch(WHC + '/a', [{'op': 'test', 'path': '/spec/schedule', 'value': 'nope'}])
        eq((code, e['reason']), (422, 'Invalid'))
        code, e = c.jsonpatch(WHC + '/a', [{'op': 'replace', 'path': '/metadata/resourceVersion', 'value': '1'}])
        eq(code, 409)

    @check('strategic merge patch: 415 on custom resources; merge keys on built-ins (containers by name)')
    def _():
        code, e = c.smp(WHC + '/a', {'spec': {'schedule': '1h'}})
        eq(code, 415)
        pod = {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': 'p', 'finalizers': ['a/a']},
               'spec': {'containers': [{'name': 'a', 'image': 'x'}, {'name': 'b', 'image': 'y'}]}}
        eq(c.post(PODS, pod)[0], 201)
        code, p = c.smp(PODS + '/p', {'metadata': {'finalizers': ['b/b']},
                                      'spec': {'containers': [{'name': 'b', 'image': 'z'}]}})
        eq(code, 200)
        eq([(x['name'], x['image']) for x in p['spec']['containers']], [('a', 'x'), ('b', 'z')])
        eq(p['metadata']['finalizers'], ['a/a', 'b/b'])
        code, p = c.smp(PODS + '/p', {'spec': {'containers': [{'name': 'a', '$patch': 'delete'}]},
                                      '$deleteFromPrimitiveList/metadata': None,
                                      'metadata': {'$deleteFromPrimitiveList/finalizers': ['a/a', 'b/b']}})
        eq([x['name'] for x in p['spec']['containers']], ['b'])
        assert 'finalizers' not in p['metadata'], p['metadata']

    @check('server-side apply: needs fieldManager; creates (201); merges; drops fields the manager stopped applying')
    def _():
        cfg = whc('ssa')
        code, e = c.apply(WHC + '/ssa', cfg, manager=None)
        eq(code, 422)
        cfg['metadata']['labels'] = {'a': '1', 'b': '2'}
        code, o = c.apply(WHC + '/ssa', cfg)
        eq(code, 201)
        eq(o['metadata']['labels'], {'a': '1', 'b': '2'})
        c.merge(WHC + '/ssa', {'metadata': {'annotations': {'other': 'manager'}}})
        cfg['metadata']['labels'] = {'a': '1'}
        code, o = c.apply(WHC + '/ssa', cfg)
        eq(code, 200)
        eq(o['metadata']['labels'], {'a': '1'})
        eq(o['metadata']['annotations'], {'other': 'manager'})
        cfg['spec']['backfill'] = {'events': '9d'}
        eq(c.apply(WHC + '/ssa', cfg)[1]['spec']['backfill']['events'], '9d')
        del cfg['spec']['backfill']
        code, o = c.apply(WHC + '/ssa', cfg)  # the manager stops applying backfill: it goes (its default returns)
        eq((code, o['spec']['backfill']['events']), (200, '60d'))
        eq(c.get(WHC + '/ssa')[1]['spec']['backfill']['events'], '60d')
        code, o = c.apply(WHC + '/ssa/status', {'apiVersion': cfg['apiVersion'], 'kind': cfg['kind'],
                                                'metadata': {'name': 'ssa'}, 'status': {'observedGeneration': 1}})
        eq((code, o['status']), (200, {'observedGeneration': 1}))

    @check('Secret stringData is folded into base64 data')
    def _():
        code, s = c.post('/api/v1/namespaces/default/secrets',
                         {'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': 'sec'}, 'stringData': {'k': 'v'}})
        eq((code, s.get('data'), 'stringData' in s), (201, {'k': 'dg=='}, False))

    @check('dryRun=All: create/patch/delete answer but persist nothing')
    def _():
        code, o = c.post(WHC + '?dryRun=All', whc('dry'))
        eq(code, 201)
        eq(c.get(WHC + '/dry')[0], 404)
        _, before = c.get(WHC + '/a')
        _, o = c.merge(WHC + '/a?dryRun=All', {'spec': {'schedule': '11h'}})
        eq(o['spec']['schedule'], '11h')
        _, after = c.get(WHC + '/a')
        eq(after['metadata']['resourceVersion'], before['metadata']['resourceVersion'])
        eq(c.delete(WHC + '/a?dryRun=All')[0], 200)
        eq(c.get(WHC + '/a')[0], 200)

    @check('label selectors: =, !=, in, notin, exists, !exists; field selectors on metadata.name/namespace')
    def _():
        def names(q):
            code, body = c.get(WHC + '?' + q)
            eq(code, 200, q)
            return sorted(o['metadata']['name'] for o in body['items'])
        eq(names('labelSelector=tier%3Dgold'), ['a'])
        assert 'a' not in names('labelSelector=tier!%3Dgold')
        eq(names('labelSelector=tier%20in%20(gold,silver)'), ['a'])
        assert 'a' not in names('labelSelector=tier%20notin%20(gold)')
        eq(names('labelSelector=tier'), ['a'])
        assert 'a' not in names('labelSelector=!tier')
        eq(names('fieldSelector=metadata.name%3Da'), ['a'])
        assert 'a' not in names('fieldSelector=metadata.name!%3Da')
        eq(c.get(WHC + '?fieldSelector=spec.schedule%3D1h')[0], 400)
        code, body = c.get('/apis/profilesync.dev/v1alpha1/warehouseconnections?fieldSelector=metadata.namespace%3Ddefault')
        assert len(body['items']) >= 2

    @check('list pagination: limit + continue')
    def _():
        code, p1 = c.get(WHC + '?limit=2')
        eq(len(p1['items']), 2)
        token = p1['metadata']['continue']
        code, p2 = c.get(WHC + f'?limit=100&continue={token}')
        _, full = c.get(WHC)
        eq([o['metadata']['name'] for o in p1['items'] + p2['items']], [o['metadata']['name'] for o in full['items']])

    @check('watch: without resourceVersion sends ADDED for existing objects, then live events')
    def _():
        w = c.watch(WHC + '?watch=true&labelSelector=tier%3Dgold')
        evs = w.events(0.4)
        eq([(t, o['metadata']['name']) for t, o in evs], [('ADDED', 'a')])
        c.merge(WHC + '/a', {'spec': {'schedule': '6h'}})
        evs = w.events(0.4)
        eq([(t, o['spec']['schedule']) for t, o in evs], [('MODIFIED', '6h')])
        w.close()

    @check('watch: resumes after a resourceVersion (only later events), label-selector transitions')
    def _():
        _, lst = c.get(WHC)
        rv = lst['metadata']['resourceVersion']
        c.post(WHC, whc('w1', labels={'tier': 'gold'}))
        w = c.watch(WHC + f'?watch=true&resourceVersion={rv}&labelSelector=tier%3Dgold')
        evs = w.events(0.4)
        eq([(t, o['metadata']['name']) for t, o in evs], [('ADDED', 'w1')])
        c.merge(WHC + '/w1', {'metadata': {'labels': {'tier': None}}})
        c.merge(WHC + '/w1', {'metadata': {'labels': {'tier': 'gold'}}})
        evs = w.events(0.4)
        eq([t for t, _ in evs], ['DELETED', 'ADDED'])
        w.close()

    @check('watch: fieldSelector metadata.name; named-object watch path; timeoutSeconds ends the stream')
    def _():
        w = c.watch(WHC + '?watch=true&fieldSelector=metadata.name%3Dw1&timeoutSeconds=1')
        evs = w.events(0.3)
        eq([o['metadata']['name'] for _, o in evs], ['w1'])
        c.merge(WHC + '/a', {'spec': {'schedule': '7h'}})
        eq(w.events(0.3), [])
        assert w.closed.wait(3), 'stream did not end after timeoutSeconds'
        w2 = c.watch(WHC + '/w1?watch=true')
        eq([o['metadata']['name'] for _, o in w2.events(0.3)], ['w1'])
        w2.close()

    @check('watch: BOOKMARK events with allowWatchBookmarks; sendInitialEvents ends with initial-events-end')
    def _():
        _, lst = c.get(WHC)
        w = c.watch(WHC + f'?watch=true&allowWatchBookmarks=true&resourceVersion={lst["metadata"]["resourceVersion"]}')
        evs = w.events(1.0)
        assert evs and all(t == 'BOOKMARK' for t, _ in evs), evs
        assert evs[0][1]['metadata']['resourceVersion'] == lst['metadata']['resourceVersion']
        w.close()
        w = c.watch(WHC + '?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan')
        evs = w.events(0.2)
        types = [t for t, _ in evs]
        assert types[:-1] and set(types[:-1]) == {'ADDED'} and types[-1] == 'BOOKMARK', types
        eq(evs[-1][1]['metadata']['annotations'], {'k8s.io/initial-events-end': 'true'})
        w.close()

    @check('watch: a resourceVersion older than the watch cache gets a 410 Expired ERROR event')
    def _():
        for i in range(210):
            c.merge(WHC + '/w1', {'metadata': {'annotations': {'n': str(i)}}})
        w = c.watch(WHC + '?watch=true&resourceVersion=1')
        evs = w.events(0.5)
        eq([(t, o.get('code'), o.get('reason')) for t, o in evs], [('ERROR', 410, 'Expired')])
        w.close()

    @check('delete with finalizers: 202 + deletionTimestamp; no new finalizers; removal completes it')
    def _():
        c.post(WHC, {**whc('fin'), 'metadata': {'name': 'fin', 'finalizers': ['profilesync.dev/cleanup']}})
        _, o = c.get(WHC + '/fin')
        w = c.watch(WHC + f'?watch=true&resourceVersion={o["metadata"]["resourceVersion"]}')
        code, d = c.delete(WHC + '/fin')
        eq(code, 202)
        assert d['metadata']['deletionTimestamp']
        eq(d['metadata']['generation'], o['metadata']['generation'] + 1)
        code, e = c.merge(WHC + '/fin', {'metadata': {'finalizers': ['profilesync.dev/cleanup', 'new/one']}})
        eq(code, 422)
        code, d2 = c.delete(WHC + '/fin')
        eq(code, 202)
        code, _ = c.merge(WHC + '/fin', {'metadata': {'finalizers': None}})
        eq(code, 200)
        eq(c.get(WHC + '/fin')[0], 404)
        eq([t for t, _ in w.events(0.4)], ['MODIFIED', 'MODIFIED', 'DELETED'])
        w.close()

    @check('delete preconditions (uid, resourceVersion) -> 409; missing object -> 404')
    def _():
        c.post(WHC, whc('pre'))
        code, _ = c.delete(WHC + '/pre', {'preconditions': {'uid': 'nope'}})
        eq(code, 409)
        code, _ = c.delete(WHC + '/pre', {'preconditions': {'resourceVersion': '1'}})
        eq(code, 409)
        code, o = c.delete(WHC + '/pre')
        eq((code, o['metadata']['name']), (200, 'pre'))
        eq(c.delete(WHC + '/pre')[0], 404)

    @check('propagationPolicy: Background deletes dependents; Orphan strips ownerReferences; Foreground waits')
    def _():
        def owner_and_child(name):
            _, o = c.post(WHC, whc(name))
            ref = {'apiVersion': o['apiVersion'], 'kind': o['kind'], 'name': name, 'uid': o['metadata']['uid']}
            c.post(CMS, {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': f'{name}-cm', 'ownerReferences': [ref]}})
            return o
        owner_and_child('bg')
        eq(c.delete(WHC + '/bg', {'propagationPolicy': 'Background'})[0], 200)
        eq(c.get(CMS + '/bg-cm')[0], 404)
        owner_and_child('or')
        eq(c.delete(WHC + '/or', {'propagationPolicy': 'Orphan'})[0], 200)
        code, cm = c.get(CMS + '/or-cm')
        eq((code, 'ownerReferences' in cm['metadata']), (200, False))
        owner_and_child('fg')
        c.merge(CMS + '/fg-cm', {'metadata': {'finalizers': ['hold/on']}})
        code, o = c.delete(WHC + '/fg', {'propagationPolicy': 'Foreground'})
        eq(code, 202)
        assert 'foregroundDeletion' in o['metadata']['finalizers']
        eq(c.get(WHC + '/fg')[0], 200)
        c.merge(CMS + '/fg-cm', {'metadata': {'finalizers': None}})
        eq(c.get(CMS + '/fg-cm')[0], 404)
        eq(c.get(WHC + '/fg')[0], 404)

    @check('deletecollection with a label selector')
    def _():
        for n in ('dc1', 'dc2'):
            c.post(CMS, {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': n, 'labels': {'dc': 'y'}}})
        code, body = c.delete(CMS + '?labelSelector=dc%3Dy')
        eq((code, len(body['items'])), (200, 2))
        eq(c.get(CMS + '/dc1')[0], 404)

    @check('namespace deletion: Terminating, contents deleted, gone when empty; no creates meanwhile')
    def _():
        c.post('/api/v1/namespaces', {'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': 'ns1'}})
        base = WHC.replace('/default/', '/ns1/')
        c.post(base, {**whc('x'), 'metadata': {'name': 'x', 'finalizers': ['hold/on']}})
        _, owner = c.post(base, whc('owner'))
        c.post('/api/v1/namespaces/ns1/configmaps', {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {
            'name': 'dep', 'ownerReferences': [{'apiVersion': owner['apiVersion'], 'kind': owner['kind'],
                                                'name': 'owner', 'uid': owner['metadata']['uid']}]}})
        c.post('/apis/events.k8s.io/v1/namespaces/ns1/events', {'apiVersion': 'events.k8s.io/v1', 'kind': 'Event',
               'metadata': {'name': 'ev'}, 'reason': 'R', 'action': 'A', 'type': 'Normal', 'note': 'n',
               'reportingController': 'c', 'reportingInstance': 'i', 'eventTime': '2025-01-01T00:00:00.000000Z'})
        code, ns = c.delete('/api/v1/namespaces/ns1')
        eq((code, ns['status']['phase']), (202, 'Terminating'))
        eq(c.post(base, whc('y'))[0], 403)
        eq(c.get('/api/v1/namespaces/ns1/configmaps/dep')[0], 404)
        eq(c.get('/api/v1/namespaces/ns1/events/ev')[0], 404)
        eq(c.get('/api/v1/namespaces/ns1')[0], 200)
        c.merge(base + '/x', {'metadata': {'finalizers': None}})
        eq(c.get('/api/v1/namespaces/ns1')[0], 404)

    @check('CRDs: registered from crds/ at start; a CRD created through the API is served; deleting it unserves')
    def _():
        code, crd = c.get('/apis/apiextensions.k8s.io/v1/customresourcedefinitions/warehouseconnections.profilesync.dev')
        eq(code, 200)
        eq({x['type']: x['status'] for x in crd['status']['conditions']}, {'NamesAccepted': 'True', 'Established': 'True'})
        new = {'apiVersion': 'apiextensions.k8s.io/v1', 'kind': 'CustomResourceDefinition',
               'metadata': {'name': 'widgets.example.com'},
               'spec': {'group': 'example.com', 'scope': 'Cluster',
                        'names': {'plural': 'widgets', 'singular': 'widget', 'kind': 'Widget'},
                        'versions': [{'name': 'v1', 'served': True, 'storage': True,
                                      'schema': {'openAPIV3Schema': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}}}]}}
        eq(c.post('/apis/apiextensions.k8s.io/v1/customresourcedefinitions', new)[0], 201)
        eq(c.post('/apis/example.com/v1/widgets', {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'metadata': {'name': 'w'}})[0], 201)
        assert 'example.com' in {g['name'] for g in c.get('/apis')[1]['groups']}
        eq(c.delete('/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com')[0], 200)
        eq(c.get('/apis/example.com/v1/widgets')[0], 404)

    @check('Table output (as kubectl asks): printer columns of the CRD, human ages')
    def _():
        code, t = c.get(WHC + '/a', headers={'Accept': 'application/json;as=Table;v=v1;g=meta.k8s.io,application/json'})
        eq((code, t['kind']), (200, 'Table'))
        cols = [x['name'] for x in t['columnDefinitions']]
        eq(cols[0], 'Name')
        assert 'Age' in cols
        eq(t['rows'][0]['cells'][0], 'a')
        assert t['rows'][0]['cells'][cols.index('Age')].endswith('s')

    @check('Job status written by the harness through /status (kubelet stand-in)')
    def _():
        job = {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': {'name': 'j'},
               'spec': {'template': {'spec': {'restartPolicy': 'Never', 'containers': [{'name': 'c', 'image': 'i'}]}}}}
        eq(c.post('/apis/batch/v1/namespaces/default/jobs', job)[0], 201)
        code, j = c.merge('/apis/batch/v1/namespaces/default/jobs/j/status',
                          {'status': {'succeeded': 1, 'conditions': [{'type': 'Complete', 'status': 'True'}]}})
        eq((code, j['status']['succeeded']), (200, 1))
        eq(c.get('/apis/batch/v1/namespaces/default/jobs?fieldSelector=status.successful%3D1')[0], 200)

    @check('events: an events.k8s.io/v1 Event is also served as a core/v1 Event (and deleted with it)')
    def _():
        ev = {'apiVersion': 'events.k8s.io/v1', 'kind': 'Event', 'metadata': {'name': 'ev1'},
              'eventTime': '2025-01-01T00:00:00.000000Z', 'reportingController': 'profilesync.dev/operator',
              'reportingInstance': 'i', 'action': 'Sync', 'reason': 'Synced', 'type': 'Normal', 'note': 'done',
              'regarding': {'kind': 'WarehouseConnection', 'name': 'a', 'namespace': 'default'}}
        eq(c.post('/apis/events.k8s.io/v1/namespaces/default/events', ev)[0], 201)
        code, lst = c.get('/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Da')
        eq([(e['message'], e['reportingComponent'], e['involvedObject']['kind']) for e in lst['items']],
           [('done', 'profilesync.dev/operator', 'WarehouseConnection')])
        eq(c.delete('/api/v1/namespaces/default/events/ev1')[0], 200)
        eq(c.get('/apis/events.k8s.io/v1/namespaces/default/events/ev1')[0], 404)

    @check('leases: optimistic concurrency with PUT (leader-election pattern)')
    def _():
        path = '/apis/coordination.k8s.io/v1/namespaces/default/leases'
        code, l = c.post(path, {'apiVersion': 'coordination.k8s.io/v1', 'kind': 'Lease', 'metadata': {'name': 'lead'},
                                'spec': {'holderIdentity': 'a', 'leaseDurationSeconds': 15}})
        eq(code, 201)
        mine = json.loads(json.dumps(l))
        theirs = json.loads(json.dumps(l))
        mine['spec']['holderIdentity'] = 'b'
        theirs['spec']['holderIdentity'] = 'c'
        eq(c.put(path + '/lead', mine)[0], 200)
        eq(c.put(path + '/lead', theirs)[0], 409)

    proc.stdin.close()
    try:
        proc.wait(5)
        RESULTS.append(('exits on stdin EOF', True, ''))
        print('ok   exits on stdin EOF')
    except subprocess.TimeoutExpired:
        proc.kill()
        RESULTS.append(('exits on stdin EOF', False, 'still running 5 s after EOF'))
        print('FAIL exits on stdin EOF')

    proc2, port2 = start()
    w = Client(port2).watch(WHC + '?watch=true')
    proc2.send_signal(signal.SIGTERM)
    try:
        proc2.wait(5)
        ok = w.closed.wait(2)
        RESULTS.append(('exits on SIGTERM (closing open watches)', ok, '' if ok else 'watch stayed open'))
        print(f'{"ok  " if ok else "FAIL"} exits on SIGTERM (closing open watches)')
    except subprocess.TimeoutExpired:
        proc2.kill()
        RESULTS.append(('exits on SIGTERM', False, 'still running 5 s after SIGTERM'))
        print('FAIL exits on SIGTERM')

    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f'{passed} passed, {failed} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
