"""Offline checks of what deploys tuneloop: every Kubernetes manifest the kustomizations build
validates against the Kubernetes schemas, compose.yaml against the Compose spec, each image
target installs an extra that provides what its service imports, and the NATS identities of
compose, Kubernetes and nats.conf agree."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import KUSTOMIZATIONS, REPO, kustomize
from tuneloop.subjects import durable_name
from tuneloop.topology import IDENTITIES, ROSTER, SERVICES

CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("kubeflow.org/v1", "PyTorchJob")}


build = kustomize


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(kustomization):
    docs = build(kustomization)
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRDS:
            continue  # custom resources: checked below against what they point at
        kubernetes_validate.validate(d, "1.30.0", strict=True)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    # Every pod that serves metrics is found by Prometheus and by the ServiceMonitor's Service.
    pods = [(d["metadata"]["name"], d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "Job")]
    for name, tmpl in pods:
        if name in ("prometheus", "grafana"):
            continue
        assert tmpl["metadata"]["labels"].get("app.kubernetes.io/part-of") == "tuneloop", name
        env = {e["name"]: e for c in tmpl["spec"]["containers"] for e in c.get("env", [])}
        assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "nats-users", name
        if name == "nats-provision":  # the one-shot job that creates the streams: the admin identity, no metrics
            assert env["NATS_USER"]["value"] == "admin"
            continue
        assert any(p.get("name") == "metrics" for c in tmpl["spec"]["containers"] for p in c.get("ports", [])), name
        assert env["NATS_USER"]["value"] == name
    names = {n for n, _ in pods}
    assert {"nats-provision", "data-pipeline", "evaluator", "rl-reward", "checkpoint"} <= names
    if "ServiceMonitor" in by_kind:  # kube-prometheus-stack's Prometheus and Grafana, not the bundled ones
        assert not names & {"prometheus", "grafana"} and "PersistentVolumeClaim" in by_kind
        assert not {"prometheus-data", "grafana-data"} & set(by_kind["PersistentVolumeClaim"]), kustomization
        dashboards = [d for d in by_kind["ConfigMap"].values() if d["metadata"]["name"].startswith("grafana-dashboards")]
        assert dashboards and dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's label
    else:  # the bundled ones keep their data on volumes of their own
        assert {"prometheus", "grafana"} <= names
        for name, path in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
            spec = by_kind["Deployment"][name]["spec"]["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
            assert claims.get(mounts[path]) in by_kind["PersistentVolumeClaim"], (kustomization, name)
    # One trainer: a Job (one run), a PyTorchJob (one run on several nodes) or a Deployment (pool workers).
    assert sum("trainer" in by_kind.get(k, {}) for k in ("Job", "PyTorchJob", "Deployment")) == 1


def test_keda_scales_the_evaluators_on_their_own_work_queue():
    docs = build("overlays/gpu")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tuneloop-env"))
    trigger = scaled["spec"]["triggers"][0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "evaluator" and trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["stream"] == "TUNELOOP"
    assert trigger["metadata"]["consumer"] == durable_name("evaluator", env["data"]["TUNELOOP_RUN_ID"], "eval.shard")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tuneloop-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_the_sweep_overlay_runs_pools_and_keda_scales_workers_and_evaluators_on_their_queues():
    docs = build("overlays/sweep")
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tuneloop-env"))
    assert env["data"]["TUNELOOP_RUN_ID"] == "*"  # every service serves every run
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    jobs = [d["metadata"]["name"] for d in docs if d["kind"] in ("Job", "PyTorchJob")]
    assert set(SERVICES) <= set(deployments) and jobs == ["nats-provision"]  # no per-run trainer Job
    for name in SERVICES:  # ... reading that setting
        refs = [e["configMapRef"]["name"] for c in deployments[name]["spec"]["template"]["spec"]["containers"]
                for e in c.get("envFrom", [])]
        assert refs == [env["metadata"]["name"]], (name, refs)
        assert deployments[name]["metadata"]["namespace"] == env["metadata"]["namespace"]
        image = deployments[name]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith(f"ghcr.io/tuneloop/{name}:"), image
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d["spec"]["triggers"][0]["metadata"]
              for d in docs if d["kind"] == "ScaledObject"}
    assert scaled["trainer"]["consumer"] == durable_name("trainer", "*", "run.queued")
    assert scaled["evaluator"]["consumer"] == durable_name("evaluator", "*", "eval.shard")


def test_compose_file_follows_the_compose_spec_and_gives_each_service_its_identity():
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    jsonschema.validate(compose, schema)
    conf = (REPO / "k8s" / "base" / "nats" / "nats.conf").read_text()
    users = set(re.findall(r"\{user: ([a-z-]+), password: \$(\w+)", conf))
    for svc in SERVICES:
        env = compose["services"][svc]["environment"]
        var = re.fullmatch(r"\$\{(\w+):\?.*\}", env["NATS_PASSWORD"]).group(1)
        assert (env["NATS_USER"], var) in users, svc
    assert compose["services"]["cli"]["environment"]["NATS_USER"] == "operator"
    mounted = [v.split(":")[0] for s in ("prometheus", "grafana", "nats") for v in compose["services"][s]["volumes"]]
    assert all((REPO / m).exists() for m in mounted if m.startswith("./")), mounted
    assert ".env" in (REPO / ".gitignore").read_text().split()  # the passwords never get committed


def test_every_tuneloop_container_in_compose_is_unprivileged_with_a_read_only_root():
    """What the images build (uid 10001: the Dockerfile's last line of every target) is what
    compose asks for, with no capabilities, no privilege escalation and /tmp its only scratch."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    ours = {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("tuneloop/")}
    assert set(SERVICES) | {"provision", "init", "cli"} <= set(ours)
    for name, svc in ours.items():
        assert svc["user"] == "10001:10001" and svc["read_only"] is True and svc["tmpfs"] == ["/tmp"], name
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
    dockerfile = (REPO / "Dockerfile").read_text()
    for target in ("cli", *SERVICES):
        stage = dockerfile.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "\nUSER 10001:10001\n" in stage, target


def test_every_connection_to_nats_in_compose_is_tls_verified_against_the_deployments_ca():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        env, mounts = svc.get("environment") or {}, [str(v) for v in svc.get("volumes", [])]
        if svc.get("image", "").startswith("nats:"):
            assert env["NATS_TLS_SERVER_CERT"] == "/etc/nats-tls/server.pem", name
            assert any(m.endswith(":/etc/nats-tls:ro") for m in mounts), name
        elif "NATS_URL" in env:
            assert env["NATS_TLS_CA"] == "/etc/tuneloop/tls/ca.pem", name
            assert any(m.endswith("/ca.pem:/etc/tuneloop/tls/ca.pem:ro") for m in mounts), name
    conf = (REPO / "k8s" / "base" / "nats" / "nats.conf").read_text()
    assert "tls {\n  cert_file: $NATS_TLS_SERVER_CERT" in conf and "verify: true" in conf.split("cluster {", 1)[1]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_that_speaks_to_nats_on_kubernetes_verifies_it_against_the_ca(kustomization):
    docs = build(kustomization)
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tuneloop-env"))
    assert env["data"]["NATS_TLS_CA"] == "/etc/tuneloop/tls/ca.pem"
    pods = [(d["metadata"]["name"], t) for d in docs for t in
            ([d["spec"]["template"]] if "template" in d.get("spec", {}) else
             [r["template"] for r in (d.get("spec", {}).get("pytorchReplicaSpecs") or {}).values()])]
    checked = 0
    for name, t in pods:
        secrets = {v["name"]: v["secret"] for v in t["spec"].get("volumes", []) if "secret" in v}
        for c in t["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if "NATS_USER" in names:
                vol = mounts.get("/etc/tuneloop/tls")
                assert vol and secrets[vol]["secretName"] == "nats-tls", (name, c["name"])
                checked += 1
            if c["name"] == "nats":
                assert {"NATS_TLS_SERVER_CERT", "NATS_TLS_SERVER_KEY", "NATS_TLS_SERVER_CA"} <= names
                assert secrets[mounts["/etc/nats-tls"]]["secretName"] == "nats-tls"
    assert checked >= 5, checked


def _cluster_flags(args: list[str]) -> tuple[str, list[str]]:
    """A nats-server command line's server name and routes (None, [] when it is no cluster node)."""
    flag = lambda f: args[args.index(f) + 1] if f in args else None  # noqa: E731
    return flag("--name"), (flag("--routes") or "").split(",") if flag("--routes") else []


def test_nats_is_a_three_node_cluster_in_compose_and_kubernetes_with_the_tested_config():
    """Every node routes to all three, every client lists all three, and every node runs the one
    nats.conf whose permissions tests/integration/test_permissions.py checks."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    nodes = {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("nats:")}
    names, routes = zip(*(_cluster_flags(svc["command"]) for svc in nodes.values()))
    assert len(nodes) == 3 and sorted(names) == sorted(nodes) and len({tuple(r) for r in routes}) == 1
    assert sorted(r.split("//")[1].split(":")[0] for r in routes[0]) == sorted(nodes)
    assert all("./k8s/base/nats/nats.conf:/etc/nats/nats.conf:ro" in svc["volumes"] for svc in nodes.values())
    for name, svc in compose["services"].items():
        url = (svc.get("environment") or {}).get("NATS_URL")
        if url:
            assert sorted(u.split("//")[1].split(":")[0] for u in url.split(",")) == sorted(nodes), name
    manifests = build("base")
    sts = next(m for m in manifests if m["kind"] == "StatefulSet" and m["metadata"]["name"] == "nats")
    spec = sts["spec"]["template"]["spec"]
    name, routes = _cluster_flags(spec["containers"][0]["args"])
    assert sts["spec"]["replicas"] == 3 and name == "$(POD_NAME)" and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert routes == [f"nats://nats-{i}.{sts['spec']['serviceName']}:6222" for i in range(3)]
    headless = next(m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    pdb = next(m for m in manifests if m["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == {"app": "nats"}
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    env = next(m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("tuneloop-env"))
    assert env["data"]["NATS_URL"].split(",") == [f"nats://nats-{i}.nats-cluster:4222" for i in range(3)]
    config = next(m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("nats-config"))
    assert config["data"]["nats.conf"] == (REPO / "k8s" / "base" / "nats" / "nats.conf").read_text()


# What the training operator sets on every replica of a PyTorchJob (static rendezvous), which
# torchrun reads as its arguments: compose's multinode profile must set exactly these.
OPERATOR_SETS = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}


def test_the_pytorchjob_runs_what_the_compose_multinode_profile_proves():
    """The same command and identity on each node, and the torchrun topology compose gives by
    hand is the one the operator gives (2 nodes, nprocPerNode 1, rank 0 on the master); the
    replicas' pod templates validate as pods against the Kubernetes schemas."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    nodes = [compose["services"][f"trainer-{r}"] for r in (0, 1)]
    job = next(d for d in build("overlays/multinode") if d["kind"] == "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == 2 == int(nodes[0]["environment"]["PET_NNODES"])
    assert job["spec"]["nprocPerNode"] == nodes[0]["environment"]["PET_NPROC_PER_NODE"] == "1"
    for r, node in enumerate(nodes):
        env = node["environment"]
        assert {k for k in env if k.startswith("PET_")} == OPERATOR_SETS and env["PET_NODE_RANK"] == str(r)
        assert env["PET_MASTER_ADDR"] == "trainer-0" and env["NATS_USER"] == "trainer" and "multinode" in node["profiles"]
    for role, spec in replicas.items():
        container = spec["template"]["spec"]["containers"][0]
        assert container["command"] == nodes[0]["command"] == ["torchrun", "-m", "tuneloop.trainer"], role
        assert {e["name"] for e in container["env"]} >= {"NATS_USER", "NATS_PASSWORD"}, role
        assert not any(e["name"].startswith("PET_") for e in container["env"]), "the operator sets those"
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"trainer-{role}"},
                                      "spec": spec["template"]["spec"]}, "1.30.0", strict=True)


def _targets() -> dict[str, str]:
    """Dockerfile target -> the extra it installs ("" for the bare package)."""
    text = (REPO / "Dockerfile").read_text()
    out = {}
    for block in re.split(r"\n(?=FROM )", text):
        m = re.match(r"FROM \S+ AS ([\w-]+)", block)
        extra = re.search(r'pip install --no-cache-dir -e "?\.(?:\[([\w-]+)\])?"?', block)
        if m and extra:
            out[m.group(1)] = extra.group(1) or ""
    return out


def _imports(folder: Path, top_level: bool = False) -> set[str]:
    """What the modules of ``folder`` import (``top_level``: only at import time, not inside functions)."""
    mods = set()
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in (tree.body if top_level else ast.walk(tree)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"tuneloop"}


# import name -> distribution (where they differ or the import is indirect)
DIST = {"yaml": "pyyaml", "nats": "nats-py", "prometheus_client": "prometheus-client", "grafana_client": "grafana-client",
        "mlflow": "mlflow-skinny", "huggingface_hub": "huggingface-hub"}
# Packages a user installs for a feature they ask for (the config refuses the feature without them).
USER_INSTALLED = {"wandb"}


def _requirements(extra: str) -> set[str]:
    """The distributions ``pip install .[extra]`` brings, following tuneloop's own extras."""
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    reqs, todo, seen = set(), [extra] if extra else [], set()
    for r in project["dependencies"]:
        reqs.add(re.split(r"[<>=\[ ]", r)[0].lower())
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in project["optional-dependencies"][e]:
            m = re.fullmatch(r"tuneloop\[([\w,-]+)\]", r)
            if m:
                todo += m.group(1).split(",")
            else:
                reqs.add(re.split(r"[<>=\[ ]", r)[0].lower())
    return reqs


def test_each_image_target_installs_what_its_service_imports():
    targets = _targets()
    assert set(SERVICES) | {"cli"} <= set(targets), targets
    core = _requirements("")
    # The shared package's core needs only the core dependencies, but for grafana-client (imported
    # by the checkpoint service, whose extra has it), and the ml stack that models.py and
    # export.py import inside their functions: loading and exporting a
    # checkpoint, which the torch services and `tuneloop export` do, the slim images never (and gguf,
    # which the trainer's dequantization of a GGUF base imports inside gguf.py's functions, and numpy,
    # which bounds.py imports inside its function: the evaluator's verdicts, in the torch image; and
    # trl, which trl_options.py imports inside its function, checking train.trl where TRL is installed;
    # the trackers, which trackers.py imports inside log_final: an embedded run's last records; and
    # huggingface-hub (transformers'), whose ModelCard model_card.py builds for the checkpoint service's exports).
    ml = {"torch", "transformers", "peft", "gguf", "numpy", "trl", "tensorboard", "mlflow-skinny", "huggingface-hub"}
    assert {DIST.get(m, m) for m in _imports(REPO / "shared")} - core == {"grafana-client"} | ml
    assert not _imports(REPO / "shared", top_level=True) & ml
    # The operator's tools (shared/tools/, in every image with the package) import their extras
    # (the report's matplotlib, the sweep's optuna) inside the functions that need them only.
    tools = _imports(REPO / "shared" / "tools") | _imports(REPO / "shared" / "tools" / "sweep")
    assert {DIST.get(m, m) for m in tools} - core == {"matplotlib", "optuna"}
    assert not {DIST.get(m, m) for m in _imports(REPO / "shared" / "tools", top_level=True)} - core
    assert "grafana-client" in _requirements(targets["checkpoint"])
    for svc in SERVICES:
        have = _requirements(targets[svc]) | {"torch"}  # torch: the ml stage installs the pinned build
        missing = {DIST.get(m, m) for m in _imports(REPO / "services" / svc)} - have - USER_INSTALLED
        assert not missing, f"image target {svc} lacks {missing}"
        stage = re.search(rf"FROM (\S+) AS {svc}\b", (REPO / "Dockerfile").read_text()).group(1)
        assert ("ml" in stage) == next(s.torch for s in ROSTER if s.name == svc), (svc, stage)  # slim: no torch stage


def test_the_roster_is_the_services_pyproject_installs_and_runs():
    """topology.ROSTER is the one list of services: each has its folder, its package and its
    extra (what its image installs); the manifests, compose.yaml and the Dockerfile are held
    to it by the tests above."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {v.removeprefix("services/") for v in project["tool"]["setuptools"]["package-dir"].values()
               if v.startswith("services/")}
    assert folders == set(SERVICES) == {p.name for p in (REPO / "services").iterdir() if (p / "__main__.py").exists()}
    assert set(SERVICES) <= set(project["project"]["optional-dependencies"])
    made = re.search(r"for u in ([A-Z_ ]+); do", (REPO / "Makefile").read_text()).group(1).split()
    assert made == [i.upper().replace("-", "_") for i in IDENTITIES], "make secrets: one password per identity"


@pytest.mark.timeout(600)
def test_the_rl_reward_image_needs_no_ml_stack(tmp_path):
    """The slim target for real: a fresh venv with only `pip install .[rl-reward]` imports and
    starts the service (no torch, no transformers)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[rl-reward]"], capture_output=True,
                             text=True, timeout=540)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util, tuneloop.rl_reward.__main__ as m; "
                            "print(importlib.util.find_spec('torch') is None, callable(m.score_batch))"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.stdout.split() == ["True", "True"], probe.stdout + probe.stderr


def dockerfile_targets() -> dict[str, dict]:
    """target -> {"entrypoint": [...], "cmd": [...]} of the Dockerfile, inherited along FROM."""
    targets: dict[str, dict] = {}
    current = None
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM (\S+) AS (\S+)", line):
            parent = targets.get(m.group(1), {})
            current = targets[m.group(2)] = {"entrypoint": parent.get("entrypoint"), "cmd": parent.get("cmd")}
        elif current is not None and (m := re.match(r"(ENTRYPOINT|CMD) (\[.*\])", line)):
            current[m.group(1).lower()] = json.loads(m.group(2))
    return targets


def test_what_each_manifest_runs_exists_in_its_image():
    """Every tuneloop container of the manifests runs what its image has: the image's own command
    (a service module that exists), or the CLI's subcommands, or torchrun on the trainer; and every
    environment variable a manifest sets for it is one the code reads."""
    from tuneloop.tools.cli import app

    targets = dockerfile_targets()
    subcommands = {c.name or c.callback.__name__ for c in app.registered_commands}
    code = "\n".join(p.read_text() for p in [*REPO.glob("shared/**/*.py"), *REPO.glob("services/**/*.py")])
    checked = 0
    for kustomization in KUSTOMIZATIONS:
        for d in build(kustomization):
            spec = d.get("spec", {})
            templates = [spec.get("template")] if "template" in spec else [
                r["template"] for r in spec.get("pytorchReplicaSpecs", {}).values()]
            for tmpl in filter(None, templates):
                for c in tmpl["spec"]["containers"]:
                    target = next((t for t in targets if c["image"].split("/")[-1].split(":")[0] in (
                        f"tuneloop-{t}", t)), None)
                    if target is None or target in ("base", "ml"):
                        continue
                    image = targets[target]
                    argv = c.get("command") or image["entrypoint"] or []
                    argv = argv + (c.get("args") or ([] if c.get("command") else image["cmd"] or []))
                    if argv[:1] == ["tuneloop"]:
                        assert argv[1] in subcommands, (d["metadata"]["name"], argv)
                    elif argv[:2] == ["torchrun", "-m"]:
                        assert target == "trainer" and argv[2] == "tuneloop.trainer", argv
                    else:
                        assert argv[:2] == ["python", "-m"] and argv[2] == f"tuneloop.{target.replace('-', '_')}", argv
                        assert (REPO / "services" / target / "__main__.py").is_file()
                    for env in c.get("env", []):
                        assert f'"{env["name"]}"' in code or f"'{env['name']}'" in code, (d["metadata"]["name"], env)
                    checked += 1
    assert checked >= 10, checked


def test_the_task_override_mounts_one_folder_at_one_path_in_every_service_that_imports_the_users_code():
    """A task's functions run in data-pipeline (format metric), the evaluators and rl-reward, and
    `init` reads its config: each gets the same folder at the same path (docs/your-task.md)."""
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    override = yaml.safe_load((REPO / "examples" / "compose.task.yaml").read_text())
    jsonschema.validate(override, schema)
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = {name: svc["volumes"] for name, svc in override["services"].items()}
    assert set(mounts) == {"init", "data-pipeline", "evaluator", "rl-reward"} <= set(compose["services"])
    assert len({tuple(v) for v in mounts.values()}) == 1  # one folder, one path, everywhere
    [runs, task] = next(iter(mounts.values()))
    assert runs == "runs:/runs" and task.endswith(":ro") and "TUNELOOP_TASK_DIR" in task


def quantity(text) -> float:
    """A Kubernetes quantity as a number (cpu: cores, memory: bytes)."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_tuneloop_service_is_probed_for_readiness_and_liveness_and_has_limits(kustomization):
    """Ready (/healthz: connected, consumers consuming) is what a rollout and a Service wait for;
    alive (/livez) what restarts a hung process; limits bound what a replica may take, at or
    above what it requests."""
    checked = []
    for d in build(kustomization):
        if d["kind"] not in ("Deployment", "Job", "StatefulSet", "PyTorchJob"):
            continue
        templates = ([r["template"] for r in d["spec"]["pytorchReplicaSpecs"].values()] if d["kind"] == "PyTorchJob"
                     else [d["spec"]["template"]])
        for tmpl in templates:
            for c in tmpl["spec"]["containers"]:
                res = c.get("resources", {})
                assert res.get("requests") and res.get("limits"), (kustomization, d["metadata"]["name"], res)
                for key in ("cpu", "memory"):
                    if key in res["limits"]:
                        assert quantity(res["limits"][key]) >= quantity(res["requests"][key]), (d["metadata"]["name"], key)
                assert "memory" in res["limits"], d["metadata"]["name"]
                serves_metrics = any(p.get("name") == "metrics" for p in c.get("ports", []))
                if serves_metrics and d["kind"] != "PyTorchJob":  # (a PyTorchJob's ranks past 0 serve none)
                    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz", d["metadata"]["name"]
                    assert c["livenessProbe"]["httpGet"]["path"] == "/livez", d["metadata"]["name"]
                    checked.append(d["metadata"]["name"])
    assert {"data-pipeline", "evaluator", "rl-reward", "checkpoint"} <= set(checked), checked
    assert "trainer" in checked or kustomization == "overlays/multinode", checked


def test_cert_managers_certificate_is_the_secret_make_secrets_makes():
    """The documented alternative to `make secrets` for Kubernetes: the same Secret name and keys
    the pods mount (tls.crt, tls.key, ca.crt), for the hosts the servers answer at there."""
    from tuneloop import tls

    docs = list(yaml.safe_load_all((REPO / "k8s" / "components" / "cert-manager" / "certificates.yaml").read_text()))
    cert = next(d for d in docs if d["kind"] == "Certificate" and d["metadata"]["name"] == "nats-tls")
    assert cert["spec"]["secretName"] == "nats-tls" and {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    named = set(cert["spec"]["dnsNames"]) | set(cert["spec"]["ipAddresses"])
    assert named == set(tls.HOSTS) - {"nats", "nats-2", "nats-3", "::1"}  # compose's names are make secrets' only
    keys = {i["key"] for d in build("base") for v in (d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []))
            if v.get("secret", {}).get("secretName") == "nats-tls" for i in v["secret"]["items"]}
    assert keys == {"tls.crt", "tls.key", "ca.crt"}
