"""Grafana dashboards as code: the panels and their PromQL live here; the JSON is generated.

``python -m tuneloop.tools.dashboards`` writes ``k8s/base/observability/`` (the dashboard JSON,
Grafana's provisioning files and a Prometheus config), which Kubernetes (kustomize) and
Docker Compose both mount; ``--check`` fails when the files differ from this code. Every
expression is tested against a real Prometheus scraping a real run (tests/integration/
test_prometheus.py), so a renamed metric breaks a test, not a dashboard.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..topology import SERVICES

RUN = 'run_id=~"$run"'
# The task's own metrics (a variable: any task's names); the held-out loss has a panel of its own.
FRACTIONS = 'metric!~"eval_loss|perplexity"'
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(__file__).resolve().parents[2] / "k8s" / "base" / "observability"


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""


ROWS: dict[str, list[Panel]] = {
    "Training": [
        Panel("Loss", ((f"tuneloop_train_loss{{{RUN}}}", "{{run_id}}"),), description="Training loss per logged step."),
        Panel("Learning rate", ((f"tuneloop_train_learning_rate{{{RUN}}}", "{{run_id}}"),), "short",
              "Follows set-lr controls at the step they are applied."),
        Panel("Gradient norm", ((f"tuneloop_train_grad_norm{{{RUN}}}", "{{run_id}}"),)),
        Panel("Throughput", ((f"sum by (run_id) (rate(tuneloop_train_tokens_total{{{RUN}}}[1m]))", "{{run_id}}"),), "short",
              "Training tokens per second."),
        Panel("Progress", ((f"tuneloop_train_step{{{RUN}}} / tuneloop_train_max_steps{{{RUN}}}", "{{run_id}}"),),
              "percentunit"),
        Panel("Paused", ((f"tuneloop_train_paused{{{RUN}}}", "{{run_id}}"),), description="1 while paused by a control."),
        Panel("GRPO reward", ((f"tuneloop_train_reward{{{RUN}}}", "{{run_id}}"),), description="Mean reward of the step's completions."),
    ],
    "Evaluation": [
        Panel("Validation scores", ((f'tuneloop_eval_score{{{RUN}, split="val", category="all", {FRACTIONS}}}',
                                     "{{run_id}} {{metric}}"),),
              "percentunit", "Overall scores of the last verdict on the validation split: the task's metrics."),
        Panel("$metric by category",
              ((f'tuneloop_eval_score{{{RUN}, split="val", metric=~"$metric", category!="all"}}', "{{category}} {{metric}}"),),
              "percentunit", "Weak categories are what adaptive data weighs up (pick the metric above)."),
        Panel("Held-out loss", ((f'tuneloop_eval_score{{{RUN}, split="val", metric="eval_loss", category="all"}}',
                                 "{{run_id}}"),), "short",
              "Teacher-forced loss of the val demonstrations: any data set has it."),
        Panel("Evaluated step", ((f"tuneloop_eval_step{{{RUN}}}", "{{run_id}} {{split}}"),)),
        Panel("Evaluation throughput",
              ((f"sum by (run_id) (rate(tuneloop_eval_cases_total{{{RUN}}}[1m]))", "{{run_id}} cases/s"),), "short",
              "Cases per second over all evaluator replicas."),
        Panel("Queue lag", ((f"max by (run_id) (tuneloop_eval_shards_pending{{{RUN}}})", "{{run_id}}"),), "short",
              "Shards waiting on the evaluators' work queue: scale evaluators when it grows."),
        Panel("Request to verdict (p90)",
              ((f"histogram_quantile(0.9, sum by (le, run_id) (rate(tuneloop_eval_verdict_seconds_bucket{{{RUN}}}[5m])))",
                "{{run_id}}"),), "s"),
    ],
    "Rewards": [
        Panel("Reward by function",
              ((f"sum by (function) (rate(tuneloop_reward_sum_total{{{RUN}}}[1m])) / "
                f'sum by (function) (rate(tuneloop_reward_items_total{{{RUN}, outcome="scored"}}[1m]))', "{{function}}"),),
              "short", "Mean reward per function over the last minute."),
        Panel("Reward requests", ((f"sum by (outcome) (rate(tuneloop_reward_requests_total{{{RUN}}}[1m]))", "{{outcome}}"),),
              "reqps"),
        Panel("Reward latency (p95)",
              ((f"histogram_quantile(0.95, sum by (le) (rate(tuneloop_reward_request_seconds_bucket{{{RUN}}}[1m])))", "p95"),),
              "s"),
    ],
    "Data and checkpoints": [
        Panel("Rows", ((f"tuneloop_data_rows_total{{{RUN}}}", "{{split}}"),), description="Rows of the data sets announced; 'rejected': bad rows skipped."),
        Panel("Category weights", ((f"tuneloop_data_category_weight{{{RUN}}}", "{{category}}"),)),
        Panel("Checkpoints", ((f"tuneloop_checkpoints_total{{{RUN}}}", "{{run_id}}"),)),
        Panel("Checkpoint size", ((f"tuneloop_checkpoint_bytes_total{{{RUN}}} / tuneloop_checkpoints_total{{{RUN}}}", "{{run_id}}"),),
              "bytes", "Mean bytes per checkpoint."),
        Panel("Export time", ((f"tuneloop_export_seconds_sum{{{RUN}}} / tuneloop_export_seconds_count{{{RUN}}}", "{{run_id}}"),), "s"),
    ],
    "Bus and controls": [
        Panel("Events", ((f"sum by (kind, direction) (rate(tuneloop_bus_events_total{{{RUN}}}[1m]))", "{{kind}} {{direction}}"),),
              "short", "Events per second by kind, published (out) and received (in)."),
        Panel("Dead letters", ((f"sum by (kind, reason) (tuneloop_bus_dead_letters_total{{{RUN}}})", "{{kind}}: {{reason}}"),),
              "short", "Events that failed validation or handling (kept on tuneloop.<run>.dlq)."),
        Panel("Controls", ((f"sum by (command, outcome) (tuneloop_controls_total{{{RUN}}})", "{{command}} {{outcome}}"),)),
        Panel("Guards and proposals", ((f"sum by (command, outcome) (tuneloop_guards_total{{{RUN}}})", "guard {{command}} {{outcome}}"),
                                       (f"sum by (command, outcome) (tuneloop_proposals_total{{{RUN}}})", "proposal {{command}} {{outcome}}")),
              "short", "Guarded controls confirmed or rolled back; policy actions proposed and how they ended."),
    ],
}

# Applied controls and checkpoints as annotations on every time series panel. changes() misses a
# series born at 1 (the first control of a command), hence the second half: series new this minute.
def _changed(series: str) -> str:
    return f"changes({series}[1m]) > 0 or ({series} unless {series} offset 1m)"


CONTROL_ANNOTATION = _changed(f'tuneloop_controls_total{{{RUN}, outcome="applied"}}')
CHECKPOINT_ANNOTATION = _changed(f"tuneloop_checkpoints_total{{{RUN}}}")
ROLLBACK_ANNOTATION = _changed(f'tuneloop_guards_total{{{RUN}, outcome="rolled_back"}}')


METRIC_VALUES = f"label_values(tuneloop_eval_score{{{RUN}, {FRACTIONS}}}, metric)"


def expressions() -> list[str]:
    """Every PromQL expression the dashboard runs (panels and annotations)."""
    return [e for panels in ROWS.values() for p in panels for e, _ in p.exprs] + [
        CONTROL_ANNOTATION, CHECKPOINT_ANNOTATION, ROLLBACK_ANNOTATION]


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for row, items in ROWS.items():
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, p in enumerate(items):
            panels.append({
                "type": "timeseries", "title": p.title, "id": pid, "description": p.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [{"datasource": DATASOURCE, "expr": e, "legendFormat": legend, "refId": chr(65 + k)}
                            for k, (e, legend) in enumerate(p.exprs)],
            })
            pid += 1
        y += ((len(items) + 2) // 3) * 8
    return {
        "uid": "tuneloop", "title": "tuneloop", "tags": ["tuneloop"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "5s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "run", "label": "run", "type": "query", "datasource": DATASOURCE, "includeAll": True, "multi": True,
            "allValue": ".*", "refresh": 2, "query": {"query": "label_values(tuneloop_train_step, run_id)", "refId": "run"},
            "definition": "label_values(tuneloop_train_step, run_id)", "current": {"text": "All", "value": "$__all"},
        }, {
            "name": "metric", "label": "metric", "type": "query", "datasource": DATASOURCE, "includeAll": False,
            "multi": False, "refresh": 2, "query": {"query": METRIC_VALUES, "refId": "metric"},
            "definition": METRIC_VALUES,
        }]},
        "annotations": {"list": [
            {"name": "controls", "enable": True, "iconColor": "orange", "datasource": DATASOURCE,
             "expr": CONTROL_ANNOTATION, "step": "5s", "titleFormat": "{{command}}", "textFormat": "control applied",
             "tagKeys": "command,run_id"},
            {"name": "checkpoints", "enable": True, "iconColor": "blue", "datasource": DATASOURCE,
             "expr": CHECKPOINT_ANNOTATION, "step": "5s", "titleFormat": "checkpoint", "tagKeys": "run_id"},
            {"name": "rollbacks", "enable": True, "iconColor": "red", "datasource": DATASOURCE,
             "expr": ROLLBACK_ANNOTATION, "step": "5s", "titleFormat": "{{command}} rolled back",
             "textFormat": "guard broken: back to the savepoint", "tagKeys": "command,run_id"},
        ]},
        "panels": panels,
    }


PROMETHEUS = {
    # Compose: every replica of every service, found by DNS (docker compose up --scale evaluator=3).
    # DNS is looked up again every 2 s (Prometheus's default is 30 s): a restarted container has a
    # new address, and a trainer restarted twice in a minute would otherwise go unscraped.
    "prometheus-compose.yml": f"""\
# Generated by `python -m tuneloop.tools.dashboards`: scrapes every replica of every tuneloop service.
global:
  scrape_interval: 5s
rule_files: [/etc/prometheus/prometheus-rules.yml]
scrape_configs:
  - job_name: tuneloop
    dns_sd_configs:
      - names: [{", ".join(SERVICES)}]
        type: A
        port: 9100
        refresh_interval: 2s
    relabel_configs:
      - source_labels: [__meta_dns_name]
        target_label: service
""",
    # Kubernetes: every pod of the namespace with a port named "metrics".
    "prometheus-k8s.yml": """\
# Generated by `python -m tuneloop.tools.dashboards`: scrapes every tuneloop pod's "metrics" port.
global:
  scrape_interval: 5s
rule_files: [/etc/prometheus/prometheus-rules.yml]
scrape_configs:
  - job_name: tuneloop
    kubernetes_sd_configs:
      - role: pod
        namespaces: {names: [tuneloop]}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_container_port_name]
        regex: metrics
        action: keep
      - source_labels: [__meta_kubernetes_pod_label_app]
        target_label: service
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
""",
}

RULES = """\
# Generated by `python -m tuneloop.tools.dashboards`; checked by promtool in the tests.
groups:
  - name: tuneloop
    rules:
      - alert: TuneloopDeadLetters
        # increase() misses a series born at 1, hence the second half: series new in the last 5 minutes
        expr: increase(tuneloop_bus_dead_letters_total[5m]) > 0 or (tuneloop_bus_dead_letters_total unless tuneloop_bus_dead_letters_total offset 5m)
        labels: {severity: warning}
        annotations:
          summary: "{{ $labels.kind }} events of run {{ $labels.run_id }} go to the dead-letter subject ({{ $labels.reason }})"
      - alert: TuneloopEvalBacklog
        expr: max by (run_id) (tuneloop_eval_shards_pending) > 20
        for: 5m
        labels: {severity: warning}
        annotations:
          summary: "run {{ $labels.run_id }}: {{ $value }} evaluation shards waiting; add evaluator replicas"
      - alert: TuneloopTrainerStalled
        expr: changes(tuneloop_train_step[10m]) == 0 and tuneloop_train_paused == 0 and tuneloop_train_step < tuneloop_train_max_steps
        for: 5m
        labels: {severity: critical}
        annotations:
          summary: "run {{ $labels.run_id }} has not stepped for 10 minutes and is not paused"
      - alert: TuneloopRewardErrors
        expr: sum by (run_id) (rate(tuneloop_reward_requests_total{outcome="error"}[5m])) > 0
        labels: {severity: warning}
        annotations:
          summary: "rl-reward refuses requests of run {{ $labels.run_id }}"
"""

PROVISIONING = {
    "grafana-datasource.yaml": """\
apiVersion: 1
datasources:
  - name: Prometheus
    uid: prometheus
    type: prometheus
    access: proxy
    url: http://prometheus:9090
    isDefault: true
""",
    "grafana-dashboards.yaml": """\
apiVersion: 1
providers:
  - name: tuneloop
    type: file
    options:
      path: /var/lib/grafana/dashboards
""",
}


def files() -> dict[str, str]:
    return {"tuneloop-dashboard.json": json.dumps(dashboard(), indent=2) + "\n", **PROMETHEUS,
            "prometheus-rules.yml": RULES, **PROVISIONING}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the Grafana dashboard and provisioning files.")
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from the code")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stale = [name for name, text in files().items()
             if not (args.out / name).is_file() or (args.out / name).read_text() != text]
    if args.check:
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}; run python -m tuneloop.tools.dashboards", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
