"""What cannot run here is checked against its publishers' schemas, pinned in schemas/package.json:
the custom resources of k8s/ (KEDA ScaledObject, ServiceMonitor) against their CRD schemas
(@kubernetes-models), and the Grafana dashboard against @grafana/schema at the version compose
runs, with TypeScript's `satisfies` (a misspelt key, a wrong type or a bad enum fails). Each
check is shown to fail on a broken copy too. No Kubernetes API server, KEDA or Grafana can be
had on these machines; `make test-deploy` runs these beside the compose stack."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest

from helpers import KUSTOMIZATIONS, REPO, kustomize as build

pytestmark = pytest.mark.deploy
SCHEMAS = REPO / "tests" / "deploy" / "schemas"
DASHBOARD = REPO / "k8s" / "base" / "observability" / "tuneloop-dashboard.json"


@pytest.fixture(scope="module")
def npm():
    if shutil.which("npm") is None:
        pytest.fail("npm is needed for the schema checks (Node.js 20 with npm)")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=SCHEMAS, check=True, timeout=600)


def check_crds(docs: list[dict]) -> subprocess.CompletedProcess:
    return subprocess.run(["node", "check-crds.mjs"], input=json.dumps(docs), capture_output=True, text=True,
                          cwd=SCHEMAS, timeout=120)


def test_custom_resources_validate_against_their_crd_schemas(npm):
    seen = set()
    for kustomization in KUSTOMIZATIONS:
        out = check_crds(build(kustomization))
        print(out.stdout)
        assert out.returncode == 0, out.stdout + out.stderr
        seen |= {ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("ok ")}
    assert seen == {"ScaledObject", "ServiceMonitor"}, seen
    scaled = next(d for d in build("overlays/gpu") if d["kind"] == "ScaledObject")
    broken = copy.deepcopy(scaled)
    broken["spec"]["maxReplicaCount"] = "many"
    out = check_crds([broken])
    assert out.returncode == 1 and "INVALID ScaledObject" in out.stdout, out.stdout


def typecheck(board: dict) -> subprocess.CompletedProcess:
    (SCHEMAS / "dashboard.gen.ts").write_text(
        'import type { TuneloopDashboard } from "./dashboard-type.js";\n'
        f"export const dashboard = {json.dumps(board, indent=1)} satisfies TuneloopDashboard;\n")
    return subprocess.run(["npx", "--no-install", "tsc", "-p", "."], capture_output=True, text=True, cwd=SCHEMAS,
                          timeout=300)


def test_the_dashboard_type_checks_against_grafanas_schema(npm):
    board = json.loads(DASHBOARD.read_text())
    out = typecheck(board)
    assert out.returncode == 0, out.stdout + out.stderr
    misspelt, wrong_type, bad_enum = (copy.deepcopy(board) for _ in range(3))
    misspelt["panels"][1]["gridPoss"] = misspelt["panels"][1].pop("gridPos")
    wrong_type["refresh"] = 5
    bad_enum["templating"]["list"][0]["type"] = "querry"
    for broken, says in ((misspelt, "'\"gridPoss\"' does not exist"), (wrong_type, "not assignable to type 'string'"),
                         (bad_enum, '"querry"')):
        out = typecheck(broken)
        assert out.returncode != 0 and says in out.stdout, out.stdout
    typecheck(board)  # leave the real one behind
