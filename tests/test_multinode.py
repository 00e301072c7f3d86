"""Beyond one machine: advertised endpoints, a multi-node rehearsal, and the deployment recipes.

The rehearsal runs two torchrun "nodes" of one job on this machine (`--nnodes 2`, node ranks 0 and 1,
two gloo ranks each, static rendezvous on loopback) whose ranks bind and advertise different loopback
addresses (127.0.0.2 and 127.0.0.3, set per node with TRAINMON_METRICS__* variables as a job script
does), and a real Prometheus that finds all four through the exported file_sd config over the shared
`<runs>/.trainmon-targets/`. The recipes of deploy/ (Kubernetes manifests, the Slurm script) are
checked as far as this machine allows: they parse, name real config keys, and agree with each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, start_prometheus, wait_until

from monitor.cli.export import export_scrape_config
from monitor.config import MetricsConfig, load_config
from monitor.config_load import ignored_env
from monitor.exporters.endpoint import advertised, metrics_endpoint, node_name, split_hostport
from monitor.runlog.rundir import SHARED_TARGETS_DIR, RunDir
from monitor.watch.daemon import Watcher

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "multinode_loop.py"
DEPLOY = ROOT / "deploy"
RUN = "multinode"
# Node 0 sets only the bind address (a loopback one is advertised as it is); node 1 also advertises.
NODES = {0: {"TRAINMON_METRICS__HOST": "127.0.0.2"},
         1: {"TRAINMON_METRICS__HOST": "127.0.0.3", "TRAINMON_METRICS__ADVERTISE": "127.0.0.3"}}
NODE_ADDR = {0: "127.0.0.2", 1: "127.0.0.3"}


def _loopback_aliases() -> None:
    """Skip where 127.0.0.2 is no address of this machine (Linux routes all of 127/8 to lo; macOS does not)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError as e:
            pytest.skip(f"cannot bind 127.0.0.2 here ({e}): the rehearsal needs loopback aliases")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the advertised address -----------------------------------------------------------------------

def test_advertised_address_defaults_and_overrides() -> None:
    def adv(local_rank: int = 0, bound: int = 9741, **kw: object) -> tuple[str, int]:
        return advertised(MetricsConfig(**kw), bound, local_rank)

    assert adv() == ("127.0.0.1", 9741)                              # loopback: as bound
    assert adv(host="127.0.0.2") == ("127.0.0.2", 9741)
    assert adv(host="10.1.2.3") == ("10.1.2.3", 9741)                # one address of this machine: itself
    assert adv(host="0.0.0.0") == (node_name(), 9741)                # every interface: the node's name
    assert adv(host="::") == (node_name(), 9741)
    assert node_name()
    assert adv(host="0.0.0.0", advertise="node7.cluster") == ("node7.cluster", 9741)
    assert adv(1, 9741, host="0.0.0.0", advertise="gw.example:30000") == ("gw.example", 30001)  # + LOCAL_RANK
    assert adv(advertise="[fd00::7]:9800") == ("fd00::7", 9800)
    assert split_hostport("fd00::7") == ("fd00::7", None)
    with pytest.raises(ValueError):
        split_hostport("host:http")


def test_the_advertised_endpoint_is_what_targets_and_run_json_list(tmp_path: Path) -> None:
    """Bound to one address, advertised as another: a Prometheus elsewhere scrapes the advertised one."""
    _loopback_aliases()
    cfg = MetricsConfig(host="127.0.0.2", port=0, advertise="trainer-3.example")
    server, [ep] = metrics_endpoint(CollectorRegistry(), cfg, rank=2, local_rank=0)
    assert server is not None
    try:
        assert (ep.host, ep.port, ep.url) == ("trainer-3.example", server.port,
                                              f"http://trainer-3.example:{server.port}/metrics")
        assert server.url == f"http://127.0.0.2:{server.port}/metrics"
        with socket.create_connection(("127.0.0.2", server.port), timeout=5):
            pass
        rd = RunDir(tmp_path / "runs" / "r", 2)
        rd.add_endpoint(ep, "r")
        v6 = ep.model_copy(update={"rank": 3, "host": "fd00::7"})
        rd.add_endpoint(v6, "r")
        targets = json.loads((rd.path / "targets.json").read_text())
        assert [t["targets"] for t in targets] == [[f"trainer-3.example:{server.port}"], [f"[fd00::7]:{server.port}"]]
        assert json.loads((rd.path / "run.json").read_text())["endpoints"][0]["url"] == ep.url
        # Readable by other local users (a Prometheus or a `monitor watch` running as another user).
        want = 0o644 & ~_umask()
        for f in (rd.path / "targets.json", rd.path / "run.json", rd.shared_targets_path):
            assert stat.S_IMODE(f.stat().st_mode) == want, f
    finally:
        server.close()


# -- the multi-node rehearsal ---------------------------------------------------------------------

def _torchrun(node: int, run_dir: Path, stop: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINMON_") and k != "MONITOR_RUN_DIR"}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **NODES[node])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
           "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(WORKER), str(run_dir), str(stop)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: list[subprocess.Popen], timeout: float = 60.0) -> list[int | None]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            codes.append(None)
    return codes


@pytest.mark.slow
def test_two_nodes_four_ranks_scraped_by_one_prometheus_through_the_shared_targets(tmp_path: Path) -> None:
    _loopback_aliases()
    runs, stop = tmp_path / "runs", tmp_path / "stop"
    runs.mkdir()
    run_dir = runs / RUN
    # The exported config, as an operator writes it before any run starts (file_sd over the shared dir).
    config = yaml.safe_load(export_scrape_config(tmp_path / "prometheus.yml", [runs], interval="1s"))
    [files] = [c["files"] for j in config["scrape_configs"] for c in j["file_sd_configs"]]
    assert files == [str(runs.resolve() / SHARED_TARGETS_DIR / "*.json")]
    logs = {n: tmp_path / f"node{n}.log" for n in NODES}

    def output() -> str:
        return "\n".join(f"--- node {n}:\n{p.read_text(errors='replace')[-3000:]}" for n, p in logs.items()
                         if p.exists())

    with start_prometheus(config, workdir=tmp_path / "prometheus") as prom:
        port = free_port()
        procs = [_torchrun(n, run_dir, stop, port, logs[n]) for n in NODES]
        try:
            def up() -> list[dict]:
                dead = [p.returncode for p in procs if p.poll() is not None]
                assert not dead, f"a node exited early ({dead}):\n{output()}"
                found = prom.query(f'up{{job="trainmon", trainmon_run="{RUN}"}} == 1')
                return found if len(found) == 4 else []

            targets = wait_until(up, 240, "4 ranks' targets up in Prometheus")
            by_rank = {t["metric"]["trainmon_rank"]: t["metric"]["instance"] for t in targets}
            assert sorted(by_rank) == ["0", "1", "2", "3"]
            # Global rank = node rank x 2 + local rank: each node's ranks are scraped at its own address,
            # on the same ports (9740 + LOCAL_RANK, as on real nodes).
            for rank, instance in by_rank.items():
                host, port_ = split_hostport(instance)
                assert host == NODE_ADDR[int(rank) // 2], (rank, instance)
            assert {split_hostport(by_rank["0"])[1], split_hostport(by_rank["1"])[1]} == {
                split_hostport(by_rank["2"])[1], split_hostport(by_rank["3"])[1]}

            # Every rank's own series, from its own endpoint; the global ones from rank 0 only.
            def stepping() -> list[dict]:
                found = prom.query(f'trainmon_optimizer_steps_total{{run="{RUN}"}} > 0')
                return found if len(found) == 4 else []

            for s in wait_until(stepping, 60, "every rank's steps scraped"):
                assert s["metric"]["instance"] == by_rank[s["metric"]["rank"]]
                assert s["metric"]["trainmon_rank"] == s["metric"]["rank"]
            assert sorted(s["metric"]["rank"] for s in prom.query(f'trainmon_loss{{run="{RUN}"}}')) == ["0", "1", "2", "3"]
            assert [s["metric"]["rank"] for s in prom.query(f'trainmon_grad_norm{{run="{RUN}"}}')] == ["0"]
            [info] = prom.query(f'trainmon_run_info{{run="{RUN}"}}')
            assert info["metric"]["world_size"] == "4" and info["metric"]["instance"] == by_rank["0"]

            shared = runs / SHARED_TARGETS_DIR / f"{RUN}.json"
            assert stat.S_IMODE(shared.stat().st_mode) == 0o644 & ~_umask()
            run_json = json.loads((run_dir / "run.json").read_text())
            assert {e["rank"]: f"{e['host']}:{e['port']}" for e in run_json["endpoints"]} == {
                int(r): i for r, i in by_rank.items()}
        finally:
            stop.touch()
            codes = _stop(procs)
        assert codes == [0, 0], output()

    # Each rank removed its target when its endpoint closed: nothing left for Prometheus to scrape.
    assert json.loads((run_dir / "targets.json").read_text()) == []
    assert not (runs / SHARED_TARGETS_DIR / f"{RUN}.json").exists()
    ranks = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(4)]
    assert {r["world"] for r in ranks} == {4} and len({r["steps"] for r in ranks}) == 1

    # One `monitor watch` over the shared run tree reads every rank's files, whichever node wrote them.
    registry = CollectorRegistry()
    watcher = Watcher([runs], load_config(None, environ={}), registry=registry)
    watcher.scan()
    watcher.poll()
    watched = {s.labels["rank"]: s.value for fam in text_string_to_metric_families(generate_latest(registry).decode())
               for s in fam.samples if s.name == "trainmon_optimizer_steps_total" and s.labels.get("run") == RUN}
    watcher.close()
    assert watched == {str(r): ranks[0]["steps"] for r in range(4)}


# -- the recipes -----------------------------------------------------------------------------------

def _manifests() -> list[dict]:
    docs = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kubernetes_manifests_parse_and_agree() -> None:
    docs = _manifests()
    kinds = {(d["apiVersion"], d["kind"]): d for d in docs}
    assert set(kinds) == {("v1", "Service"), ("batch/v1", "Job"), ("monitoring.coreos.com/v1", "PodMonitor"),
                          ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
    kustomize = kinds["kustomize.config.k8s.io/v1beta1", "Kustomization"]
    assert sorted(kustomize["resources"]) == sorted(f.name for f in (DEPLOY / "kubernetes").glob("*.yaml")
                                                    if f.name != "kustomization.yaml")
    job, monitor_ = kinds["batch/v1", "Job"], kinds["monitoring.coreos.com/v1", "PodMonitor"]
    pod = job["spec"]["template"]
    [container] = pod["spec"]["containers"]
    # The PodMonitor selects the job's pods and scrapes a port the container declares, per local rank.
    assert monitor_["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    scraped = [e["port"] for e in monitor_["spec"]["podMetricsEndpoints"]]
    nproc = int(re.search(r"--nproc-per-node (\d+)", container["args"][0]).group(1))
    assert scraped == [f"metrics-r{r}" for r in range(nproc)]
    env = {e["name"]: e.get("value") for e in container["env"]}
    base = int(env["TRAINMON_METRICS__PORT"])
    assert [ports[name] for name in scraped] == [base + r for r in range(nproc)]  # 9740 + LOCAL_RANK
    # The annotations (Prometheus's kubernetes-pods job) name local rank 0's port.
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == base
    assert ann["prometheus.io/path"] == "/metrics"
    # Port names are valid IANA service names (at most 15 characters).
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", name) for name in ports)
    # The env is a valid trainmon config, every TRAINMON_* name a real key (the pod IP filled in as the
    # downward API does), and the metrics bind every interface and advertise the pod's IP.
    environ = {k: (v or "").replace("$(POD_IP)", "10.0.3.7") for k, v in env.items()}
    assert ignored_env(environ) == []
    cfg = load_config(None, environ=environ).metrics
    assert (cfg.host, cfg.advertise, cfg.port) == ("0.0.0.0", "10.0.3.7", 9740)
    assert advertised(cfg, 9741, 1) == ("10.0.3.7", 9741)
    assert "--nnodes 2" in container["args"][0] and job["spec"]["completions"] == 2


def test_kubernetes_manifests_build_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize deploy/kubernetes` not checked")
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert {d["kind"] for d in yaml.safe_load_all(done.stdout) if d} == {"Service", "Job", "PodMonitor"}


def test_slurm_script_is_valid_bash_and_sets_real_config_keys() -> None:
    script = DEPLOY / "slurm" / "trainmon.sbatch"
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    exported = dict(re.findall(r"^export (TRAINMON_\w+)=(\S+)", text, flags=re.M))
    assert exported == {"TRAINMON_METRICS__HOST": "0.0.0.0", "TRAINMON_METRICS__PORT": "9740"}
    assert ignored_env(exported) == []
    cfg = load_config(None, environ=exported).metrics
    assert advertised(cfg, 9740, 0) == (node_name(), 9740)  # each node advertises its own name
    for flag in ("--nnodes", "--node-rank", "--nproc-per-node", "--master-addr", "--master-port"):
        assert flag in text, flag
    assert "#SBATCH --ntasks-per-node=1" in text and 'MONITOR_RUN_DIR="$RUNS/' in text
