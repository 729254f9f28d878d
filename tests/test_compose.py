"""The production stack (docker-compose.yml, Dockerfile, .dockerignore), checked without Docker.

docker-compose.yml is validated against the Compose specification by the ``compose-spec`` package
(the Rust ``compose_spec`` crate): unknown keys, wrong types, unknown depends_on conditions and
undefined volumes are refused. It does not interpolate ``${VAR}``, and an interpolated port such
as ``${API_PORT:-8000}:8000`` does not parse, so ``interpolate`` below does what ``docker compose``
does first, with test values for the two required secrets (``POSTGRES_PASSWORD`` and
``REID_ADMIN_TOKEN``). Literal checks (no secret in the file) read the raw YAML.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from sqlalchemy.engine import make_url

compose_spec = pytest.importorskip("compose_spec", reason="pip install compose-spec (dev extra)")

from service.core.settings import Settings, WorkerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: What the test gives the variables the file requires (random-looking, long enough for
#: production: the settings refuse placeholders and short tokens).
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "b3f1c9a27d4e8f60a1b2c3d4e5f6a7b8",
    "REID_ADMIN_TOKEN": "kq2ZtR8xW4vN7mP1sL5yH9cB3dF6gJ0a",
}

EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "mlflow",
    "migrations",
    "api",
    "dispatcher",
    "worker-gpu0",
    "worker-gpu1",
}
#: One-shot services (no healthcheck, no restart).
ONE_SHOT = {"migrations"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|PRIVATE_KEY", re.IGNORECASE)
#: ``${NAME:?message}`` / ``${NAME?message}``: required, no default.
REQUIRED_SUBSTITUTION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}")

# --- interpolation, as docker compose does it --------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
    ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}`` (the Compose specification's forms)."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise InterpolationError(f"invalid interpolation {match[0]!r}")
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else str(value)
        if op.endswith("?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        return "" if missing else arg  # "+"

    return _VARIABLE.sub(substitute, text)


def load_compose(env: Mapping[str, str]) -> Any:
    """docker-compose.yml interpolated with ``env``, parsed and validated by compose-spec."""
    text = interpolate(COMPOSE_FILE.read_text(), env)
    # apply_merge: the file shares blocks through YAML anchors and merge keys (<<), as Compose does.
    project = compose_spec.PyOptions(apply_merge=True).from_yaml(text)
    project.validate()  # every referenced volume, network, config and secret is defined
    project.to_spec()  # and the whole tree validates against the specification's models
    return project


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(TEST_SECRETS).to_dict()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def raw_services() -> dict[str, dict[str, Any]]:
    """Before interpolation (PyYAML applies the merge keys)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command is not None, "no command"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def command_of_or_empty(service: dict[str, Any]) -> list[str]:
    return command_of(service) if "command" in service else []


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a short or long volume entry."""
    if isinstance(volume, str):
        source, target = volume.split(":")[:2]
        return source, target
    return volume["source"], volume["target"]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = "REID_") -> set[str]:
    """Every variable the settings read: REID_<FIELD>, REID_<GROUP>__<FIELD> for nested models."""
    names = set()
    for name, field in model.model_fields.items():
        env_name = f"{prefix}{name}".upper()
        names.add(env_name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_env_names(annotation, f"{env_name}__")
    return names


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container with this environment builds (no .env file, nothing inherited)."""
    for name in list(os.environ):
        if name.upper().startswith("REID_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


# --- the Compose file ---------------------------------------------------------------------------


def test_compose_file_validates_and_has_the_expected_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_required_secrets_have_no_default() -> None:
    for missing in TEST_SECRETS:
        env = {k: v for k, v in TEST_SECRETS.items() if k != missing}
        with pytest.raises(InterpolationError, match=missing):
            load_compose(env)


def test_no_literal_secret_in_the_file(raw_services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE_FILE.read_text()
    # No secret variable is given a default (${POSTGRES_PASSWORD:-x}, ${REID_ADMIN_TOKEN-x}).
    defaults = re.findall(r"\$\{(\w+):?[-+]", text)
    assert not [d for d in defaults if SECRET_NAME.search(d)], defaults
    userinfo = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s]+)@")
    for name, service in raw_services.items():
        values = [
            *environment_of(service).items(),
            *(("command", a) for a in command_of_or_empty(service)),
        ]
        for key, value in values:
            if SECRET_NAME.search(key):
                assert REQUIRED_SUBSTITUTION.fullmatch(value), (
                    f"{name}: {key} must be ${{{key}:?...}}, not {value!r}"
                )
            for match in userinfo.finditer(value):
                assert REQUIRED_SUBSTITUTION.fullmatch(match["password"]), (
                    f"{name}: a URL in {key} holds a literal password"
                )


def test_api_depends_on_migrations_postgres_and_redis(services: dict[str, Any]) -> None:
    depends = services["api"]["depends_on"]
    assert depends["migrations"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrations"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("dispatcher", "worker-gpu0", "worker-gpu1"):
        assert (
            services[name]["depends_on"]["migrations"]["condition"]
            == "service_completed_successfully"
        ), name


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"{name} is one-shot"
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        assert service.get("restart") in ("always", "unless-stopped"), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert "/health'" in services["mlflow"]["healthcheck"]["test"][-1]
    assert "/healthz'" in services["api"]["healthcheck"]["test"][-1]


def test_api_command_and_environment(services: dict[str, Any]) -> None:
    api = services["api"]
    argv = command_of(api)
    assert argv[:3] == ["python", "-m", "service"]
    args = importlib.import_module("service.__main__")._parser().parse_args(argv[3:])
    assert (args.command, args.no_migrate) == ("serve", True)  # the migrations service's job
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    env = environment_of(api)
    assert env["REID_API_WORKERS"] == "1"  # ${REID_API_WORKERS:-1}: the host's, or one
    assert env["REID_ENVIRONMENT"] == "production"
    assert env["REID_WORKER__BROKER_URL"] == "redis://redis:6379/0"
    assert env["REID_ADMIN_TOKEN"] == TEST_SECRETS["REID_ADMIN_TOKEN"]
    assert make_url(env["REID_DATABASE_URL"]).host == "postgres"
    assert command_of(services["migrations"]) == ["python", "-m", "service", "migrate"]


def test_service_environments_build_valid_production_settings(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each app container's environment passes Settings (production refuses weak secrets)."""
    app_services = [n for n, s in services.items() if "REID_DATABASE_URL" in environment_of(s)]
    assert set(app_services) == {"migrations", "api", "dispatcher", "worker-gpu0", "worker-gpu1"}
    urls = set()
    for name in app_services:
        with monkeypatch.context() as m:
            settings = settings_from(environment_of(services[name]), m)
        assert settings.environment == "production", name
        assert settings.broker_url.startswith("redis://redis:"), name
        urls.add(settings.database_url)
    assert len(urls) == 1, "every service must use the same database"


def test_every_reid_variable_is_a_settings_field() -> None:
    known = settings_env_names()
    assert {"REID_WORKER__BROKER_URL", "REID_JOB_BOUNDS__MAX_EPOCHS"} <= known  # nesting works
    for path in (COMPOSE_FILE, DOCKERFILE):
        used = set(re.findall(r"\bREID_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        assert used, path
        assert used <= known, f"{path.name}: not settings fields: {sorted(used - known)}"


def test_api_and_workers_share_job_files_and_datasets(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads, job outputs and dataset roots lie on the same mounts in the API and every worker
    (the API extracts uploads and reads logs that the workers' trainers use and write)."""
    readers = ["api", "dispatcher", "worker-gpu0", "worker-gpu1"]
    mounts_by_service = {}
    for name in readers:
        with monkeypatch.context() as m:
            settings = settings_from(environment_of(services[name]), m)
        mounts = dict(mount(v)[::-1] for v in services[name]["volumes"])
        paths = [settings.upload_path, settings.jobs_path, *settings.dataset_roots]
        assert settings.dataset_roots, name
        used = set()
        for path in paths:
            target = next((t for t in mounts if path.is_relative_to(t)), None)
            assert target is not None, f"{name}: {path} is on no volume"
            used.add((target, mounts[target]))
        mounts_by_service[name] = used
    assert len({frozenset(m) for m in mounts_by_service.values()}) == 1, mounts_by_service


def test_gpu_workers_reserve_distinct_devices_and_pin_them(
    services: dict[str, Any],
) -> None:
    worker_cli = importlib.import_module("worker.__main__")
    workers = {n: s for n, s in services.items() if gpu_devices(s)}
    assert set(workers) == {"worker-gpu0", "worker-gpu1"}
    reserved: list[str] = []
    kill_grace_s = WorkerSettings().kill_grace_s
    for name, service in workers.items():
        (device,) = gpu_devices(service)
        assert device["driver"] == "nvidia", name
        ids = [str(i) for i in device["device_ids"]]
        assert ids and "count" not in device, f"{name}: reserve devices by id"
        reserved += ids
        args = worker_cli._parser().parse_args(command_of(service)[3:])
        assert command_of(service)[:3] == ["python", "-m", "worker"], name
        assert args.command == "run", name
        # A container sees only its reserved GPUs, numbered from 0: --gpus names those.
        assert args.gpus == ",".join(str(i) for i in range(len(ids))), f"{name}: --gpus {args.gpus}"
        assert args.queues == f"gpu{len(ids)}", f"{name}: jobs asking for {len(ids)} GPU(s)"
        assert name == f"worker-gpu{ids[0]}", f"{name} reserves {ids}"
        assert service["build"]["args"]["FAISS_EXTRA"] == "gpu", name
        # SIGTERM -> the trainer checkpoints within kill_grace_s before Docker's SIGKILL.
        grace = compose_spec.parse_duration(service["stop_grace_period"])
        assert grace > kill_grace_s, name
    assert len(reserved) == len(set(reserved)), f"a GPU is reserved twice: {reserved}"
    for name, service in services.items():
        if name not in workers:
            assert service.get("build", {}).get("args", {}).get("FAISS_EXTRA") != "gpu", name


def test_dispatcher_command(services: dict[str, Any]) -> None:
    worker_cli = importlib.import_module("worker.__main__")
    argv = command_of(services["dispatcher"])
    assert argv[:3] == ["python", "-m", "worker"]
    assert worker_cli._parser().parse_args(argv[3:]).command == "dispatcher"


def test_mlflow_server(compose: dict[str, Any], services: dict[str, Any]) -> None:
    mlflow = services["mlflow"]
    argv = command_of(mlflow)
    assert argv[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in argv
    assert option(argv, "--workers") == "1"
    assert option(argv, "--host") == "0.0.0.0"
    backend = make_url(option(argv, "--backend-store-uri"))
    assert backend.get_backend_name() == "postgresql", backend
    assert backend.host == "postgres"
    service_db = make_url(environment_of(services["api"])["REID_DATABASE_URL"]).database
    assert backend.database and backend.database != service_db, "MLflow needs its own database"
    # ...which the postgres service creates on its first start.
    init_scripts = [
        compose["configs"][c["source"]]["content"]
        for c in services["postgres"]["configs"]
        if c["target"].startswith("/docker-entrypoint-initdb.d/")
    ]
    assert any(f"CREATE DATABASE {backend.database}" in s for s in init_scripts)
    destination = option(argv, "--artifacts-destination")
    assert destination in [mount(v)[1] for v in mlflow["volumes"]], "artifacts on a volume"
    assert environment_of(mlflow)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert services["mlflow"]["build"]["target"] == "mlflow"


# --- Dockerfile and build context ------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((keyword, rest))
    return stages


def test_dockerfile_base_user_and_no_secrets() -> None:
    instructions = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None
        for keyword, rest in instructions
        if keyword == "ARG"
    }
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["FAISS_EXTRA"] == "cpu"
    stages = dockerfile_stages()
    assert {"mlflow", "app"} <= set(stages)
    assert list(stages)[-1] == "app", "the default target is the project image"
    for name, stage in stages.items():
        users = [rest for keyword, rest in stage if keyword == "USER"]
        if name in ("mlflow", "app"):
            assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
    app = dict(stages["app"][::-1])  # last of each instruction
    assert app["WORKDIR"] == "/app"
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{keyword} {rest}"
    install = [
        rest for keyword, rest in stages["app"] if keyword == "RUN" and "pip install" in rest
    ]
    assert any('.[service,worker,${FAISS_EXTRA}]"' in r for r in install), install


def test_dockerfile_installs_one_faiss_per_image() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [r.split(">")[0] for r in extras["cpu"]] == ["faiss-cpu"]
    assert [r.split(">")[0] for r in extras["gpu"]] == ["faiss-gpu"]
    assert {"service", "worker"} <= set(extras)
    text = DOCKERFILE.read_text()
    assert "cpu|gpu)" in text, "FAISS_EXTRA is checked to be exactly one of cpu, gpu"


def test_dockerfile_and_compose_commands_import(services: dict[str, Any]) -> None:
    """The modules the image's CMD and the services' commands run exist."""
    cmd = dict(dockerfile_stages()["app"][::-1])["CMD"]
    commands = [json.loads(cmd)]
    commands += [command_of(s) for s in services.values() if s.get("image", "").startswith("reid-")]
    for argv in commands:
        if argv[0] == "uvicorn":
            target = argv[argv.index("--factory") + 1]
            module, attr = target.split(":")
            assert callable(getattr(importlib.import_module(module), attr)), target
        elif argv[:2] == ["python", "-m"]:
            module = argv[2]
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module
        else:
            assert argv[0] == "mlflow", argv


# Docker's .dockerignore rules: Go filepath.Match patterns (plus **), the last matching rule
# wins, and a rule matching a parent folder applies to everything under it.
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> Iterator[tuple[bool, re.Pattern[str]]]:
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        yield include, _ignore_regex(line.lstrip("!").strip("/"))


def in_build_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for include, regex in dockerignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            included = include
    return included


@pytest.mark.parametrize(
    ("path", "included"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("alembic.ini", True),
        ("migrations/env.py", True),
        ("migrations/versions/0001_initial.py", True),
        ("service/app.py", True),
        ("worker/__main__.py", True),
        ("reid_core/train.py", True),
        ("reid_core/presets/smoke.yaml", True),
        (".env", False),
        ("service/.env", False),
        (".git/config", False),
        (".venv/bin/python", False),
        ("var/reid.db", False),
        ("outputs/smoke/checkpoint.pt", False),
        ("tests/test_compose.py", False),
        ("service/__pycache__/app.cpython-311.pyc", False),
        ("reid_service.egg-info/PKG-INFO", False),
    ],
)
def test_build_context(path: str, included: bool) -> None:
    assert in_build_context(path) is included


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    copies = [rest for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    assert copies
    for rest in copies:
        sources = [w for w in rest.split() if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert in_build_context(source), f"{source} is excluded by .dockerignore"
