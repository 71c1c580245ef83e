#!/usr/bin/env python3
"""Shows what kmock's own KubernetesEmulator does, unmodified -- the evidence behind the
"kmock itself" section of tests/kmock/README.md and the reason apiserver.py answers requests
itself.  Informational: prints one line per behaviour; exits 1 only if kmock's behaviour no longer
matches what the README records (e.g. after a kmock upgrade: then re-read and update the README).

    .venv-kmock/bin/python tests/kmock/probe_raw_kmock.py
"""
import asyncio
import json
import sys

import aiohttp
import kmock

WHC = '/apis/profilesync.dev/v1alpha1/namespaces/default/warehouseconnections'
MISMATCHES = []


async def main() -> None:
    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        k.resources['profilesync.dev/v1alpha1/warehouseconnections'] = kmock.ResourceInfo(
            kind='WarehouseConnection', namespaced=True, subresources={'status'}, shortnames={'whc'})
        k.resources['v1/namespaces'] = kmock.ResourceInfo(kind='Namespace', namespaced=False)
        base = f'http://127.0.0.1:{srv.port}'
        async with aiohttp.ClientSession() as s:
            async def call(method, path, body=None, ctype='application/json'):
                data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
                async with s.request(method, base + path, data=data, headers={'Content-Type': ctype}) as r:
                    text = await r.text()
                    try:
                        return r.status, json.loads(text)
                    except ValueError:
                        return r.status, text

            def record(what, observed, expected):
                ok = observed == expected
                if not ok:
                    MISMATCHES.append(what)
                print(f'{"  " if ok else "!!"} {what}: {observed!r}' + ('' if ok else f' (README says {expected!r})'))

            code, body = await call('GET', '/api/v1')
            record('GET /api/v1 groupVersion', body.get('groupVersion'), '/v1')
            code, body = await call('GET', '/api/v1/namespaces')
            record('GET /api/v1/namespaces (URL parser)', code, 500)
            code, body = await call('GET', '/openapi/v2')
            record('GET /openapi/v2', code, 404)
            code, body = await call('GET', '/version')
            record('/version gitVersion', body.get('gitVersion'), 'v1.26.4+k3s1')
            code, o = await call('POST', WHC, {'metadata': {'name': 'a', 'labels': {'x': '1'}}, 'spec': {'l': [1, 2]}})
            record('create: status code', code, 200)
            record('create: stamps resourceVersion/uid/creationTimestamp/generation',
                   sorted(set(o['metadata']) & {'resourceVersion', 'uid', 'creationTimestamp', 'generation'}), [])
            record('create: sets metadata.namespace from the URL', 'namespace' in o['metadata'], False)
            code, o = await call('POST', WHC, {'metadata': {'name': 'a'}})
            record('create of an existing name', (code, o.get('reason')), (409, 'Object Already Exists'))
            code, o = await call('GET', WHC + '?labelSelector=x%3D2')
            record('list ignores labelSelector', len(o['items']), 1)
            record('list metadata.resourceVersion', o['metadata'].get('resourceVersion'), '...')
            code, o = await call('GET', WHC + '?fieldSelector=metadata.name%3Dzzz')
            record('list ignores fieldSelector', len(o['items']), 1)
            code, o = await call('PUT', WHC + '/a', {'metadata': {'name': 'a'}, 'spec': {}})
            record('PUT (replace)', code, 404)
            code, o = await call('PATCH', WHC + '/a', {'metadata': {'resourceVersion': '999'}, 'spec': {'l': [3]}},
                                 'application/merge-patch+json')
            record('merge patch with a stale metadata.resourceVersion', (code, o['metadata'].get('resourceVersion')), (200, '999'))
            code, o = await call('PATCH', WHC + '/a', {'spec': {'l': {'k': 1}}}, 'application/merge-patch+json')
            record('merge patch replacing a list by an object (RFC 7386 allows it)', code, 500)
            code, o = await call('PATCH', WHC + '/a', [{'op': 'test', 'path': '/spec/l', 'value': [9]}],
                                 'application/json-patch+json')
            record('JSON patch with a failing test op', code, 500)
            code, o = await call('PATCH', WHC + '/a', {'spec': {'l': [4]}}, 'application/strategic-merge-patch+json')
            record('strategic merge patch on a custom resource (real: 415)', code, 200)
            code, o = await call('PATCH', WHC + '/a', 'apiVersion: v\nkind: K\nspec:\n  l: [5]\n', 'application/apply-patch+yaml')
            record('apply patch in YAML: silently ignored', (code, o['spec']['l']), (200, [4]))
            code, o = await call('PATCH', WHC + '/nope', {'metadata': {'name': 'nope'}}, 'application/apply-patch+yaml')
            record('server-side apply of an absent object (real: creates it)', code, 404)
            code, o = await call('PATCH', WHC + '/a/status', {'spec': {'l': [6]}, 'status': {'s': 1}}, 'application/merge-patch+json')
            record('/status patch also changes spec', o['spec']['l'], [6])
            code, o = await call('PATCH', WHC + '/a', {'status': {'s': 2}}, 'application/merge-patch+json')
            record('main-resource patch also changes status', o['status'], {'s': 2})
            code, o = await call('PATCH', WHC + '/a', {'metadata': {'finalizers': ['f/x']}}, 'application/merge-patch+json')
            code, o = await call('DELETE', WHC + '/a')
            record('delete with finalizers: code, deletionTimestamp set', (code, bool(o['metadata'].get('deletionTimestamp'))), (200, True))
            code, o = await call('PATCH', WHC + '/a', {'metadata': {'finalizers': ['f/x', 'new/one']}}, 'application/merge-patch+json')
            record('adding a finalizer while deleting (real: 422)', code, 200)
            code, o = await call('PATCH', WHC + '/a', {'metadata': {'finalizers': None}}, 'application/merge-patch+json')
            code, o = await call('GET', WHC + '/a')
            record('removing the finalizers completes the deletion', code, 404)

            await call('POST', WHC, {'metadata': {'name': 'pre'}})
            events: list = []

            async def watch(path):
                async with s.get(base + path) as r:
                    async for line in r.content:
                        events.append(json.loads(line))
            task = asyncio.create_task(watch(WHC + '?watch=true&resourceVersion=999999&timeoutSeconds=1'))
            await asyncio.sleep(0.3)
            await call('POST', WHC, {'metadata': {'name': 'b'}})                            # no namespace in body
            await call('POST', WHC, {'metadata': {'name': 'c', 'namespace': 'default'}})    # namespace in body
            await asyncio.sleep(1.5)
            record('watch: initial ADDED despite resourceVersion=999999', [e['object']['metadata']['name'] for e in events][:1], ['pre'])
            record('watch: live events only for objects whose body names the namespace',
                   [e['object']['metadata']['name'] for e in events[1:]], ['c'])
            record('watch: timeoutSeconds=1 honoured (stream ended)', task.done(), False)
            task.cancel()


asyncio.run(main())
print(f'{len(MISMATCHES)} mismatches with the README' if MISMATCHES else 'kmock behaves as the README records')
sys.exit(1 if MISMATCHES else 0)
