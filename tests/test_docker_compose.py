"""The Docker Compose deployment, checked without a Docker engine.

docker-compose.yaml is read with yaml.safe_load (anchors and ``<<`` merges resolved the way
Compose resolves them), Dockerfile and .env.example as text. What needs a running engine
(that the image builds, that the healthchecks pass) is out of reach here; everything about
the file's shape, its wiring and its secrets is not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

NON_AIRFLOW_SERVICES = {"postgres", "redis", "demo-api"}
#: Run once and exit: there is nothing for a healthcheck to watch.
ONE_SHOT_SERVICES = {"airflow-init", "airflow-cli"}
REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "flower",
    "demo-api",
}
COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
    "flower": "celery flower",
    "demo-api": "python /opt/airflow/include/demo_api.py --host 0.0.0.0 --port 8090",
}
#: What each healthcheck must probe, as a fragment of its command.
HEALTHCHECK_PROBES = {
    "postgres": "pg_isready",
    "redis": "redis-cli ping",
    "airflow-apiserver": "http://localhost:8080/api/v2/",
    "airflow-scheduler": "http://localhost:8974/health",
    "airflow-dag-processor": "airflow jobs check --job-type DagProcessorJob",
    "airflow-triggerer": "airflow jobs check --job-type TriggererJob",
    "airflow-worker": "inspect ping",
    "flower": "http://localhost:5555",
    "demo-api": "http://localhost:8090/health",
}
PUBLISHED_PORTS = {"airflow-apiserver": "8080:8080", "demo-api": "8090:8090", "flower": "5555:5555"}
#: Where a published port binds unless .env says otherwise: this machine only.
DEFAULT_BIND_ADDRESS = "127.0.0.1"
BIND_ADDRESS_VARIABLE = "AIRFLOW_BIND_ADDRESS"
#: host folder -> container folder, on every Airflow service.
PROJECT_MOUNTS = {
    "./dags": "/opt/airflow/dags",
    "./plugins": "/opt/airflow/plugins",
    "./include": "/opt/airflow/include",
    "./logs": "/opt/airflow/logs",
    "./data": "/opt/airflow/data",
}

SECRET_NAME = re.compile(r"FERNET|SECRET|PASSWORD|TOKEN|KEY")
#: Names that point at a secret rather than hold one (a path, a command), by convention.
SECRET_POINTER_NAME = re.compile(r"_(FILE|PATH|CMD)$")
#: The whole value is one ${VAR:?message}: Compose stops with the message when VAR is unset.
REQUIRED_SUBSTITUTION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
#: Compose's interpolation: "$$" is a literal dollar, "${NAME...}" and "$NAME" are variables.
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
DEFAULTED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-(?P<default>[^}]*)\}")
ENV_ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


# --------------------------------------------------------------------------
# Reading the files.
# --------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def airflow_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if name not in NON_AIRFLOW_SERVICES}


def long_running_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if name not in ONE_SHOT_SERVICES}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of Compose's two forms it is written in."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def as_text(command: str | list[str] | None) -> str:
    return " ".join(command) if isinstance(command, list) else (command or "")


def strings_in(node: Any) -> Iterator[str]:
    """Every string of the parsed file: Compose interpolates values, never comments."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def variables_used(text: str) -> set[str]:
    return {m["braced"] or m["bare"] for m in INTERPOLATION.finditer(text) if m["braced"] or m["bare"]}


def interpolated(value: str) -> str:
    """The value as Compose would expand it with .env unset: defaults used, required ones as 'x'."""
    value = DEFAULTED.sub(lambda m: m["default"], value)
    return re.sub(r"\$\{[^}]*\}", "x", value)


def env_example() -> dict[str, str]:
    assignments = (ENV_ASSIGNMENT.match(line.strip()) for line in ENV_EXAMPLE.read_text().splitlines())
    return {m["name"]: m["value"] for m in assignments if m}


def requirement_pin(path: Path, distribution: str) -> str:
    match = re.search(rf"^{re.escape(distribution)}==(\S+)", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} has no '{distribution}==<version>' line"
    return match[1]


def dockerfile_base_tag() -> str:
    match = re.search(r"^FROM\s+apache/airflow:(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile has no 'FROM apache/airflow:<tag>' line"
    return match[1]


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path, for the short "host:container[:mode]" syntax."""
    result = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        result[target] = source
    return result


def problems_message(problems: list[str]) -> str:
    return "\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------
# Services, commands and healthchecks.
# --------------------------------------------------------------------------


def test_every_required_service_is_defined() -> None:
    missing = sorted(REQUIRED_SERVICES - services().keys())
    assert not missing, f"docker-compose.yaml lacks the services {missing}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_service_runs_its_component(name: str) -> None:
    command = as_text(services()[name].get("command"))
    assert command == COMMANDS[name], f"service {name} runs {command!r}, expected {COMMANDS[name]!r}"


def test_every_long_running_service_has_a_healthcheck() -> None:
    lacking = sorted(
        name
        for name, svc in long_running_services().items()
        if not (svc.get("healthcheck") or {}).get("test") or (svc.get("healthcheck") or {}).get("disable")
    )
    assert not lacking, f"these services have no healthcheck: {lacking}"


@pytest.mark.parametrize("name", sorted(HEALTHCHECK_PROBES))
def test_each_healthcheck_probes_its_own_service(name: str) -> None:
    probe = as_text((services()[name].get("healthcheck") or {}).get("test"))
    assert HEALTHCHECK_PROBES[name] in probe, (
        f"the healthcheck of {name} is {probe!r}; it should contain {HEALTHCHECK_PROBES[name]!r}"
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED_PORTS))
def test_each_web_ui_is_published_on_its_port_on_the_loopback_by_default(name: str) -> None:
    ports = [interpolated(str(port)) for port in services()[name].get("ports", [])]
    expected = f"{DEFAULT_BIND_ADDRESS}:{PUBLISHED_PORTS[name]}"
    assert expected in ports, f"service {name} publishes {ports} with .env unset, expected {expected!r}"


def published_ports() -> Iterator[tuple[str, Any]]:
    for name, svc in services().items():
        for port in svc.get("ports", []):
            yield name, port


def test_no_port_is_published_on_every_interface_unless_env_says_so() -> None:
    # A bare "8080:8080" (or "0.0.0.0:...") publishes on every interface of the host: the UI
    # and Flower would face the network before anyone chose that.
    problems = []
    for name, port in published_ports():
        if isinstance(port, dict):
            host_ip = interpolated(str(port.get("host_ip", "")))
        else:
            parts = interpolated(str(port)).split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
        if host_ip != DEFAULT_BIND_ADDRESS:
            problems.append(f"{name} publishes {port!r} on {host_ip or 'every interface'} with .env unset")
    assert not problems, problems_message(problems)


def test_the_bind_address_of_every_published_port_comes_from_env() -> None:
    problems = [
        f"{name} publishes {port!r}, not bound to ${{{BIND_ADDRESS_VARIABLE}:-{DEFAULT_BIND_ADDRESS}}}"
        for name, port in published_ports()
        if not str(port).startswith(f"${{{BIND_ADDRESS_VARIABLE}:-{DEFAULT_BIND_ADDRESS}}}:")
    ]
    assert not problems, problems_message(problems)
    assert env_example().get(BIND_ADDRESS_VARIABLE) == DEFAULT_BIND_ADDRESS, (
        f".env.example should set {BIND_ADDRESS_VARIABLE}={DEFAULT_BIND_ADDRESS}, the safe default"
    )


def test_flower_starts_only_with_its_profile() -> None:
    profiles = services()["flower"].get("profiles", [])
    assert profiles == ["flower"], f"flower has profiles {profiles}; it should be only in profile 'flower'"


def test_the_worker_can_be_scaled() -> None:
    worker = services()["airflow-worker"]
    pinned = [key for key in ("container_name", "ports") if key in worker]
    assert not pinned, f"airflow-worker sets {pinned}: a second replica would clash with the first"


# --------------------------------------------------------------------------
# Start-up order.
# --------------------------------------------------------------------------


def test_every_airflow_service_waits_for_healthy_postgres_and_redis() -> None:
    problems = [
        f"{name} does not wait for {backend} to be healthy"
        for name, svc in airflow_services().items()
        for backend in ("postgres", "redis")
        if (svc.get("depends_on") or {}).get(backend, {}).get("condition") != "service_healthy"
    ]
    assert not problems, problems_message(problems)


def test_every_long_running_airflow_service_waits_for_airflow_init_to_succeed() -> None:
    problems = [
        f"{name} does not wait for airflow-init to complete successfully"
        for name, svc in airflow_services().items()
        if name not in ONE_SHOT_SERVICES
        and (svc.get("depends_on") or {}).get("airflow-init", {}).get("condition")
        != "service_completed_successfully"
    ]
    assert not problems, problems_message(problems)


def test_the_worker_waits_for_a_healthy_api_server() -> None:
    condition = (services()["airflow-worker"].get("depends_on") or {}).get("airflow-apiserver", {}).get("condition")
    assert condition == "service_healthy", (
        f"airflow-worker waits for airflow-apiserver with condition {condition!r}; tasks need its Execution API"
    )


def test_airflow_init_migrates_the_database_and_sets_the_admin_password() -> None:
    init = services()["airflow-init"]
    env = environment(init)
    script = as_text(init.get("command"))
    problems = []
    if env.get("_AIRFLOW_DB_MIGRATE") != "true":
        problems.append("airflow-init does not set _AIRFLOW_DB_MIGRATE=true")
    if "/entrypoint airflow" not in script:
        problems.append("airflow-init never runs the image entrypoint, which is what migrates")
    if "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" not in script:
        problems.append("airflow-init does not write the simple auth manager's password file")
    assert not problems, problems_message(problems)


# --------------------------------------------------------------------------
# Airflow configuration.
# --------------------------------------------------------------------------


def test_every_airflow_service_uses_the_celery_executor() -> None:
    problems = [
        f"{name} has AIRFLOW__CORE__EXECUTOR={environment(svc).get('AIRFLOW__CORE__EXECUTOR')!r}"
        for name, svc in airflow_services().items()
        if environment(svc).get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor"
    ]
    assert not problems, problems_message(problems)


@pytest.mark.parametrize(
    ("variable", "schemes", "host"),
    [
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", {"postgresql+psycopg2"}, "postgres"),
        ("AIRFLOW__CELERY__RESULT_BACKEND", {"db+postgresql", "db+postgresql+psycopg2"}, "postgres"),
        ("AIRFLOW__CELERY__BROKER_URL", {"redis"}, "redis"),
        ("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", {"http"}, "airflow-apiserver"),
    ],
    ids=["database", "celery-result-backend", "celery-broker", "execution-api"],
)
def test_every_airflow_service_reaches_its_backends_by_service_name(
    variable: str, schemes: set[str], host: str
) -> None:
    assert host in services(), f"{variable} should point at service {host!r}, which is not defined"
    problems = []
    for name, svc in airflow_services().items():
        url = urlsplit(interpolated(environment(svc).get(variable, "")))
        if url.scheme not in schemes or url.hostname != host:
            problems.append(f"{name}: {variable} is {url.geturl()!r}, expected {'|'.join(sorted(schemes))}://…@{host}")
    assert not problems, problems_message(problems)


def test_every_airflow_service_mounts_the_project_folders() -> None:
    problems = [
        f"{name} does not mount {host} at {target}"
        for name, svc in airflow_services().items()
        for host, target in PROJECT_MOUNTS.items()
        if mounts(svc).get(target) != host
    ]
    assert not problems, problems_message(problems)


def test_every_airflow_service_writes_its_data_into_the_mounted_data_folder() -> None:
    problems = [
        f"{name} has NETWORK_REQUESTS_DATA_DIR={environment(svc).get('NETWORK_REQUESTS_DATA_DIR')!r}"
        for name, svc in airflow_services().items()
        if environment(svc).get("NETWORK_REQUESTS_DATA_DIR") != PROJECT_MOUNTS["./data"]
    ]
    assert not problems, problems_message(problems)


def test_the_api_connection_defaults_to_the_demo_api_service() -> None:
    problems = [
        f"{name} has AIRFLOW_CONN_NETWORK_REQUEST_API={environment(svc).get('AIRFLOW_CONN_NETWORK_REQUEST_API')!r}"
        for name, svc in airflow_services().items()
        if interpolated(environment(svc).get("AIRFLOW_CONN_NETWORK_REQUEST_API", "")) != "http://demo-api:8090"
    ]
    assert not problems, problems_message(problems)


def test_every_airflow_service_keeps_the_rate_limit_gate_in_redis() -> None:
    # The workers and the triggerer are separate containers: the Variable store (a file lock
    # in /tmp) would let a stale writer overwrite a block (docs/distributed.md).
    problems = [
        f"{name} has AIRFLOW__NETWORK_REQUESTS__GATE_STORE={environment(svc).get('AIRFLOW__NETWORK_REQUESTS__GATE_STORE')!r}"
        for name, svc in airflow_services().items()
        if environment(svc).get("AIRFLOW__NETWORK_REQUESTS__GATE_STORE") != "redis"
    ]
    assert not problems, problems_message(problems)


def test_the_gate_reaches_the_redis_service_through_the_redis_default_connection_apart_from_the_broker() -> None:
    problems = []
    for name, svc in airflow_services().items():
        env = environment(svc)
        gate = urlsplit(interpolated(env.get("AIRFLOW_CONN_REDIS_DEFAULT", "")))
        broker = urlsplit(interpolated(env.get("AIRFLOW__CELERY__BROKER_URL", "")))
        gate_db = parse_qs(gate.query).get("db", ["0"])[0]
        broker_db = broker.path.strip("/") or "0"
        if (gate.scheme, gate.hostname, gate.port) != ("redis", "redis", 6379):
            problems.append(f"{name}: AIRFLOW_CONN_REDIS_DEFAULT is {gate.geturl()!r}, not the redis service")
        if gate_db == broker_db:
            problems.append(f"{name}: the gate and Celery's broker share Redis database {gate_db}")
        if "AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID" in env and env["AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID"] != "redis_default":
            problems.append(f"{name}: the gate's connection id is not redis_default")
    assert not problems, problems_message(problems)


# --------------------------------------------------------------------------
# Image and versions.
# --------------------------------------------------------------------------


def test_the_dockerfile_builds_on_the_airflow_version_pinned_in_requirements() -> None:
    pinned = requirement_pin(ROOT / "requirements.txt", "apache-airflow")
    tag = dockerfile_base_tag()
    assert tag.split("-")[0] == pinned, (
        f"Dockerfile builds FROM apache/airflow:{tag} but requirements.txt pins apache-airflow=={pinned}"
    )


def test_the_constraints_pin_the_same_airflow_version_as_requirements() -> None:
    pinned = requirement_pin(ROOT / "requirements.txt", "apache-airflow")
    constrained = requirement_pin(ROOT / "constraints.txt", "apache-airflow")
    assert constrained == pinned, f"constraints.txt pins apache-airflow=={constrained}, requirements.txt =={pinned}"


def test_every_airflow_service_runs_the_image_built_from_the_dockerfile() -> None:
    pinned = requirement_pin(ROOT / "requirements.txt", "apache-airflow")
    problems = []
    for name, svc in services().items():
        if name in {"postgres", "redis"}:
            continue
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        if context != ".":
            problems.append(f"{name} is not built from ./Dockerfile (build: {build!r})")
        image = str(svc.get("image", ""))
        if image.rpartition(":")[2] != pinned:
            problems.append(f"{name} tags its image {image!r}; the tag should be the Airflow version {pinned}")
    assert not problems, problems_message(problems)


def test_the_dockerfile_installs_the_distributed_requirements_with_the_constraints() -> None:
    installs = [line for line in dockerfile_instructions() if line.startswith("RUN") and "pip install" in line]
    assert installs, "Dockerfile has no 'RUN pip install' instruction"
    problems = [
        f"the Dockerfile's pip install lacks {flag!r}: {installs}"
        for flag in ("-r requirements-distributed.txt", "-c constraints.txt", "--no-cache-dir")
        if not any(flag in line for line in installs)
    ]
    assert not problems, problems_message(problems)


def test_the_dockerfile_copies_every_file_the_install_reads() -> None:
    copied = " ".join(line for line in dockerfile_instructions() if line.startswith("COPY"))
    needed = ("requirements.txt", "requirements-distributed.txt", "constraints.txt")
    missing = [name for name in needed if name not in copied]
    assert not missing, f"Dockerfile never copies {missing} into the image"


def test_the_dockerfile_installs_as_the_airflow_user() -> None:
    user = "airflow"  # the base image's user
    for line in dockerfile_instructions():
        if line.startswith("USER"):
            user = line.split()[1].split(":")[0]
        if line.startswith("RUN") and "pip install" in line:
            assert user == "airflow", f"Dockerfile runs pip install as user {user!r}, not 'airflow'"


# --------------------------------------------------------------------------
# Secrets and .env.
# --------------------------------------------------------------------------


def test_no_secret_is_written_into_the_compose_file() -> None:
    problems = [
        f"{name}: {key}={value!r} is not a ${{VAR:?message}} substitution"
        for name, svc in services().items()
        for key, value in environment(svc).items()
        if SECRET_NAME.search(key)
        and not SECRET_POINTER_NAME.search(key)
        and not REQUIRED_SUBSTITUTION.fullmatch(value)
    ]
    assert not problems, problems_message(problems)


def test_no_password_is_written_into_a_url_of_the_compose_file() -> None:
    problems = []
    for name, svc in services().items():
        for key, value in environment(svc).items():
            for password in re.findall(r"://[^:/@\s]*:([^@]*)@", value):
                if password and not REQUIRED_SUBSTITUTION.fullmatch(password):
                    problems.append(f"{name}: {key} has the password {password!r} written in")
    assert not problems, problems_message(problems)


def test_the_admin_password_reaches_only_airflow_init() -> None:
    holders = sorted(name for name, svc in services().items() if "_AIRFLOW_WWW_USER_PASSWORD" in environment(svc))
    assert holders == ["airflow-init"], (
        f"_AIRFLOW_WWW_USER_PASSWORD is in the environment of {holders}, expected only airflow-init"
    )


def test_every_variable_the_compose_file_uses_is_listed_in_env_example() -> None:
    used = set().union(*(variables_used(text) for text in strings_in(compose())))
    missing = sorted(used - env_example().keys())
    assert not missing, f".env.example does not list {missing}, which docker-compose.yaml uses"


def test_env_example_holds_no_secret_values() -> None:
    filled = sorted(name for name, value in env_example().items() if SECRET_NAME.search(name) and value.strip())
    assert not filled, f".env.example gives values to the secrets {filled}; leave them empty for the user to generate"


def test_env_is_ignored_by_git_and_env_example_is_not() -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def ignored(path: str) -> bool:
        result = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True, text=True
        )
        if result.returncode not in (0, 1):
            pytest.skip(f"git check-ignore failed: {result.stderr.strip()}")
        return result.returncode == 0

    env_ignored, example_ignored = ignored(".env"), ignored(".env.example")
    assert env_ignored, ".env is not in .gitignore: the secrets in it could be committed"
    assert not example_ignored, ".gitignore also ignores .env.example, which must be committed"
