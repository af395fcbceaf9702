"""The scale-out files (infra/compose.yaml, infra/k8s/*.yaml), which cannot run here: no Docker
engine, no Kubernetes cluster. What can be checked without them is checked: they parse; every
process of ours runs from the image this repository builds; every `flywheel`, `prefect`, `mlflow`
and `ray` command line parses with the real CLI; URLs point at services and ports that exist; and
every environment variable they set is one the platform reads, or one a named third-party server
or client reads (an explicit allow-list, checked against the installed package where there is one).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flows import cli
from flows.lifecycle_config import LifecycleConfig
from infra import services

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose.yaml"
K8S = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
PLATFORM_CODE = ("stages", "flows", "infra", "registry", "ui")
OUR_PROGRAMS = ("flywheel", "prefect", "mlflow", "ray", "python")

# Settings that these files set for third-party servers and clients, not for our code: name -> who
# reads it. Where that package is installed here, test_every_variable_is_read_by_someone asks it.
THIRD_PARTY = {
    "POSTGRES_USER": "the postgres image", "POSTGRES_PASSWORD": "the postgres image",
    "POSTGRES_DB": "the postgres image",
    "MINIO_ROOT_USER": "the minio image", "MINIO_ROOT_PASSWORD": "the minio image",
    # botocore (boto3; aiobotocore under s3fs, DVC's S3 remote); the per-service endpoint since 1.31
    "AWS_ACCESS_KEY_ID": "botocore", "AWS_SECRET_ACCESS_KEY": "botocore", "AWS_ENDPOINT_URL_S3": "botocore",
    "PREFECT_API_DATABASE_CONNECTION_URL": "prefect", "PREFECT_UI_API_URL": "prefect",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "prefect",
    "MLFLOW_S3_ENDPOINT_URL": "mlflow", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "mlflow",
    "RAY_USAGE_STATS_ENABLED": "ray",
}


def _prefect_knows(name: str) -> bool:
    import prefect.settings

    return hasattr(prefect.settings, name)


def _mlflow_knows(name: str) -> bool:
    import mlflow.environment_variables

    return hasattr(mlflow.environment_variables, name)


def _ray_knows(name: str) -> bool:
    from ray._common.usage import usage_constants

    return name in vars(usage_constants).values()


KNOWS = {"prefect": _prefect_knows, "mlflow": _mlflow_knows, "ray": _ray_knows}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node):
    """Every dict inside a YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def k8s_containers() -> list[tuple[Path, dict]]:
    return [(path, node) for path, doc in k8s_documents() for node in walk(doc)
            if "image" in node and "name" in node]


def set_variables() -> dict[str, list[str]]:
    """Every environment variable a file sets -> where."""
    found: dict[str, list[str]] = {}
    for name, service in compose()["services"].items():
        for var in compose_env(service):
            found.setdefault(var, []).append(f"compose.yaml:{name}")
    for path, container in k8s_containers():
        for var in container.get("env") or []:
            found.setdefault(var["name"], []).append(f"{path.name}:{container['name']}")
    return found


def platform_reads() -> set[str]:
    """Names our code reads from the environment (os.environ.get/[...], getenv), plus the service table."""
    read = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")
    names = set(services.ENV_VARS.values())  # read as os.environ.get(ENV_VARS[name])
    for folder in PLATFORM_CODE:
        for source in (ROOT / folder).rglob("*.py"):
            names |= set(read.findall(source.read_text()))
    return names


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every program a file starts, shell wrappers (`sh -c "a && exec b"`) unpacked."""
    raw: list[tuple[str, list[str] | str]] = []
    for name, service in compose()["services"].items():
        if service.get("command"):
            raw.append((f"compose.yaml:{name}", service["command"]))
    for path, container in k8s_containers():
        if container.get("command"):
            raw.append((f"{path.name}:{container['name']}", container["command"]))
    for path, doc in k8s_documents():
        if doc["kind"] == "RayJob":
            raw.append((f"{path.name}:entrypoint", doc["spec"]["entrypoint"]))
    lines = []
    for where, command in raw:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if argv[:2] == ["sh", "-c"]:
            argv = shlex.split(argv[2])
        elif argv[:2] == ["python", "-c"]:
            lines.append((where, argv))
            continue
        current: list[str] = []
        for word in [*argv, "&&"]:
            if word in ("&&", "&", ";", "||"):
                if current:
                    lines.append((where, current[1:] if current[0] == "exec" else current))
                current = []
            else:
                current.append(word)
    return lines


# ----------------------------------------------------------------------------- the tests


def test_files_parse_and_say_they_cannot_run_here():
    assert {"prefect", "prefect-db", "mlflow", "mlflow-db", "minio", "ray-head", "ray-worker", "annotation",
            "worker", "serving"} <= set(compose()["services"])
    kinds = {doc["kind"] for _, doc in k8s_documents()}
    assert {"RayCluster", "RayJob"} <= kinds
    for path in [COMPOSE, *K8S]:
        header = path.read_text().split("\n\n")[0]
        assert "NOT RUN HERE" in header, f"{path.name}: its header must say it is not run on these machines"


def test_our_processes_run_from_the_image_this_repository_builds():
    services_ = compose()["services"]
    built = {s["image"]: s["build"] for s in services_.values() if "build" in s}
    platform = services_["worker"]["image"]
    assert platform in built
    for name, service in services_.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest", f"compose.yaml:{name}: image {image} is not pinned"
        command = " ".join(map(str, service.get("command") or []))
        if any(re.search(rf"(^|[\s&]){p}\s", command + " ") for p in OUR_PROGRAMS):
            assert image in built, f"compose.yaml:{name} runs our code from {image}, not an image built here"
    for image, build in built.items():
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, f"{image}: build context is not the repo"
        for source in re.findall(r"^COPY (\S+) ", build["dockerfile_inline"], re.M):
            assert (ROOT / source).exists(), f"{image}: COPY {source}: no such file in the repository"
        assert f" AS {build['target']}" in build["dockerfile_inline"], f"{image}: no stage {build['target']}"
    for path, container in k8s_containers():
        assert container["image"] == platform, f"{path.name}:{container['name']} runs {container['image']}"


def test_every_command_line_parses_with_the_real_cli():
    import mlflow.cli
    from ray.scripts.scripts import start as ray_start

    prefect_help = subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "start", "--help"],
                                  capture_output=True, text=True, timeout=60).stdout
    seen = set()
    for where, argv in command_lines():
        program = argv[0]
        seen.add(program)
        if program == "flywheel":
            try:
                args = cli.parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{shlex.join(argv)}` is not a flywheel command line")
            if args.command == "run":
                LifecycleConfig.load(args.preset, args.overrides)  # raises on an unknown key
        elif program == "mlflow":
            assert argv[1] == "server", where
            mlflow.cli.server.make_context("server", argv[2:])  # click: UsageError on an unknown option
        elif program == "ray":
            assert argv[1] == "start", where
            ray_start.make_context("start", argv[2:])
        elif program == "prefect":
            assert argv[1:3] == ["server", "start"], where
            for option in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
                assert re.search(rf"{re.escape(option)}\b", prefect_help), f"{where}: prefect has no {option}"
        elif program == "python":
            compile(argv[2], where, "exec")
        elif program in ("git", "server"):  # git init, minio's own
            continue
        else:
            pytest.fail(f"{where}: unexpected program {program}")
    assert {"flywheel", "prefect", "mlflow", "ray"} <= seen


def listening_ports(service: dict) -> set[int]:
    command = " ".join(map(str, service.get("command") or []))
    ports = {int(p) for p in re.findall(r"--port[= ](\d+)|TCP-LISTEN:(\d+)", command) for p in p if p}
    image = service["image"].split(":")[0]
    return ports | {"postgres": {5432}, "minio/minio": {9000}}.get(image, set())


def test_urls_point_at_services_and_ports_that_exist():
    services_ = compose()["services"]
    addresses = []
    for name, service in services_.items():
        for var, value in compose_env(service).items():
            if re.match(r"^[a-z0-9+]+://|^[a-z0-9-]+:\d+$", value):
                addresses.append((f"{name}: {var}", value))
        for word in map(str, service.get("command") or []):
            addresses += [(f"{name}: {word}", v) for v in re.findall(r"\w[\w+]*://\S+", word)]
        test = " ".join(map(str, (service.get("healthcheck") or {}).get("test", [])))
        addresses += [(f"{name}: healthcheck", v) for v in re.findall(r"http://[\w.:]+", test)]
    checked = 0
    for where, value in addresses:
        parts = urlsplit(value if "://" in value else f"tcp://{value}")
        if parts.scheme == "s3" or parts.hostname in (None, "localhost", "0.0.0.0"):
            continue  # buckets, and addresses a browser on the host uses
        host = where.split(":")[0] if parts.hostname == "127.0.0.1" else parts.hostname
        assert host in services_, f"{where}: {value} names no compose service"
        assert parts.port in listening_ports(services_[host]), \
            f"{where}: {value}: {host} listens on {sorted(listening_ports(services_[host]))}"
        checked += 1
    assert checked >= 10


def test_kubernetes_manifests_agree_with_each_other():
    import ray

    docs = {doc["kind"]: doc for _, doc in k8s_documents()}
    cluster, job = docs["RayCluster"], docs["RayJob"]
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs")
    (worker,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["RAY_ADDRESS"] == f"{cluster['metadata']['name']}-head-svc:{gcs}"  # KubeRay's service name
    claims = {doc["metadata"]["name"] for _, doc in k8s_documents() if doc["kind"] == "PersistentVolumeClaim"}
    used = {n["persistentVolumeClaim"]["claimName"] for _, doc in k8s_documents() for n in walk(doc)
            if "persistentVolumeClaim" in n}
    assert used and used <= claims


def test_every_variable_is_read_by_someone():
    ours = platform_reads()
    assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "FLYWHEEL_LABELS_DB", "FLYWHEEL_DVC_REMOTE",
            "SERVING_URL", "FLYWHEEL_HOME"} <= ours  # the reader itself works
    used = set_variables()
    for var, where in used.items():
        if var in ours:
            continue
        assert var in THIRD_PARTY, f"{var} (set in {', '.join(where)}) is read by nothing: not by our code, " \
                                   "and not in the third-party allow-list"
        reader = THIRD_PARTY[var]
        if reader in KNOWS:
            assert KNOWS[reader](var), f"{var}: {reader} does not know this setting"
    stale = sorted(set(THIRD_PARTY) - set(used))
    assert not stale, f"allow-listed but set nowhere: {stale}"
    assert not set(THIRD_PARTY) & ours, "a name our code reads needs no allow-list entry"
