"""Every pod of every kustomization meets the Pod Security Standards' "restricted" profile
(kubernetes.io/docs/concepts/security/pod-security-standards, the rules as of v1.30: baseline
and restricted), checked rule by rule on the manifests `kubectl kustomize` builds, the CRDs'
pod templates (PyTorchJob) included; and tuneloop's own containers have read-only root
filesystems with their writable volumes mounted."""

from __future__ import annotations

import pytest

from helpers import KUSTOMIZATIONS, kustomize

# restricted: the volume types a pod may use
VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
# baseline: capabilities a container may add (restricted: only NET_BIND_SERVICE)
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def pods(docs: list[dict]):
    """(where, pod spec) of every workload: Deployments, StatefulSets, Jobs, CronJobs, PyTorchJobs."""
    for d in docs:
        spec, name = d.get("spec") or {}, f"{d['kind']}/{d['metadata']['name']}"
        if "template" in spec:
            yield name, spec["template"]["spec"]
        if "jobTemplate" in spec:
            yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
        for role, replica in (spec.get("pytorchReplicaSpecs") or {}).items():
            yield f"{name}/{role}", replica["template"]["spec"]


def violations(pod: dict) -> list[str]:
    out = []
    psc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]
    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is set")
    if psc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
        out.append("pod seLinuxOptions.type")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {s['name']}")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccomp Unconfined")
    # restricted
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= VOLUMES:
            out.append(f"volume {v['name']} of type {sorted(kinds)}")
    for c in containers:
        sc, where = c.get("securityContext") or {}, f"container {c['name']}"
        if sc.get("privileged"):
            out.append(f"{where} privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{where} hostPort")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where} procMount")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where} allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            out.append(f"{where} runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{where} runs as uid 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where} seccompProfile is {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where} does not drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where} adds {caps['add']}")
    return out


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_meets_the_restricted_pod_security_standard(kustomization):
    found = list(pods(kustomize(kustomization)))
    assert found
    bad = {name: v for name, pod in found if (v := violations(pod))}
    assert not bad, bad


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_a_read_only_root_and_its_writable_volumes(kustomization):
    for name, pod in pods(kustomize(kustomization)):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, (name, c["name"])
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["image"].split("/")[-1].startswith(("tuneloop", "trainer")):  # ours: HOME and caches in /tmp
                assert "/tmp" in mounts, (name, c["name"], mounts)


def test_the_checks_catch_what_the_standard_forbids():
    """Each rule refuses the pod that breaks it (the checks above cannot pass by accident)."""
    ok = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
          "containers": [{"name": "c", "image": "i", "securityContext": {
              "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}
    assert violations(ok) == []
    import copy

    def broken(change) -> list[str]:
        pod = copy.deepcopy(ok)
        change(pod)
        return violations(pod)

    assert broken(lambda p: p["securityContext"].update(runAsUser=0)) == ["container c runs as uid 0"]
    assert broken(lambda p: p["securityContext"].pop("runAsNonRoot")) == ["container c runAsNonRoot is not true"]
    assert broken(lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"))
    assert broken(lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]))
    assert broken(lambda p: p.update(hostNetwork=True)) == ["hostNetwork is set"]
    assert broken(lambda p: p.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]))
    assert broken(lambda p: p["securityContext"].pop("seccompProfile")) == ["container c seccompProfile is None"]
