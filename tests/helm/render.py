#!/usr/bin/env python3
"""Renders and lints charts/profiles-sync with the real Helm engine, for tests/helm_chart.rs.

Reads one JSON request on stdin and writes one JSON answer on stdout:

  request: {"chart": DIR,
            "render": [{"name": CASE, "values": {...}, "release": NAME, "namespace": NS}],
            "reject": [{"name": CASE, "values": {...}}]}
  answer:  {"helm": {"sdk": VERSION, "helm_c": VERSION},
            "rendered": {CASE: {"manifests": {TEMPLATE_PATH: YAML}, "lint": REPORT,
                                "schema_error": MESSAGE | null}},
            "rejected": {CASE: {"render_error": MESSAGE | null, "schema_error": MESSAGE | null,
                                "lint": REPORT, "render_error_without_schema": MESSAGE | null}}}

REPORT is helm_python.lint()'s {"messages": [{"severity", "path", "error"}], "errors": [...]},
linted with strict=True. "render_error_without_schema" renders a copy of the chart without
values.schema.json, as `helm install --skip-schema-validation` would, so that the templates' own
guards can be tested (lint can't: in lint mode Helm turns `fail` into a log line).
Nothing is judged here: the Rust test decides what passes.
"""

import json
import os
import shutil
import sys
import tempfile

import helm_python as helm


def lint(chart_dir, values, namespace):
    return helm.lint(chart_dir, values, strict=True, namespace=namespace)


def render_error(chart, values):
    try:
        chart.render(values, name="profiles-sync", namespace="profiles-sync")
    except helm.HelmError as e:
        return str(e)
    return None


def schema_error(chart, values):
    try:
        chart.validate_schema(values)
    except helm.HelmError as e:
        return str(e)
    return None


def main():
    request = json.load(sys.stdin)
    chart_dir = request["chart"]
    answer = {"helm": {"sdk": helm.helm_sdk_version(), "helm_c": helm.helm_c_version()},
              "rendered": {}, "rejected": {}}
    with tempfile.TemporaryDirectory() as tmp:
        schemaless_dir = os.path.join(tmp, "profiles-sync")
        shutil.copytree(chart_dir, schemaless_dir)
        os.remove(os.path.join(schemaless_dir, "values.schema.json"))
        with helm.Chart.load(chart_dir) as chart, helm.Chart.load(schemaless_dir) as schemaless:
            for case in request.get("render", []):
                values = case["values"]
                answer["rendered"][case["name"]] = {
                    "manifests": chart.render(values, name=case["release"],
                                              namespace=case["namespace"], is_install=True),
                    "lint": lint(chart_dir, values, case["namespace"]),
                    "schema_error": schema_error(chart, values),
                }
            for case in request.get("reject", []):
                values = case["values"]
                answer["rejected"][case["name"]] = {
                    "render_error": render_error(chart, values),
                    "schema_error": schema_error(chart, values),
                    "lint": lint(chart_dir, values, "profiles-sync"),
                    "render_error_without_schema": render_error(schemaless, values),
                }
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
