"""The compose files, read the way Docker Compose reads them: each parses and names only the three
services; each service is health-checked on its own port (the two gRPC services through the gRPC
health service, the gateway through its /ready) and has a restart policy and a stop grace period,
the two model services an shm size; each command is one its service's parser accepts; the GPU override reserves GPUs and shares the host's IPC; and the test override puts every
service in the host's network namespace with every address on 127.0.0.1, so CI's traffic never
crosses a Docker bridge. Pure Python (PyYAML comes with transformers); where `docker compose` is
installed, the merged test configuration is also checked as Compose itself resolves it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from diffusion_service.settings import parse_settings
from gateway.__main__ import parse_settings as parse_gateway_settings
from prefill_service.settings import parse_settings as parse_prefill_settings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
TEST = ROOT / "docker-compose.test.yml"
SERVICES = {"diffusion", "prefill", "gateway"}
MODEL_SERVICES = {"diffusion", "prefill"}  # they load the checkpoint and speak gRPC
ADDRESS_FLAGS = ("--listen", "--diffusion", "--server")


class Reset:
    """Compose's `!reset` (drop what the files before set) or `!override` (replace it whole)."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: ComposeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return Reset(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)


def services(path: Path) -> dict[str, dict]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)["services"]


def interpolated(text: str) -> str:
    """`${NAME:-default}` -> default, as Compose does with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def command(service: dict) -> list[str]:
    return interpolated(service["command"]).split()


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_file_parses_and_names_only_the_three_services():
    assert set(services(BASE)) == SERVICES
    assert set(services(GPU)) == SERVICES
    assert set(services(TEST)) == SERVICES


@pytest.mark.parametrize("override", [None, GPU, TEST], ids=["cpu", "gpu", "test"])
def test_each_service_is_health_checked_on_its_own_port_with_restart_shm_and_grace(override):
    base = services(BASE)
    for name, service in base.items():
        merged = {**service, **(services(override)[name] if override else {})}
        port = flag(command(merged), "--listen").rsplit(":", 1)[1]
        if name in MODEL_SERVICES:
            assert merged["healthcheck"]["test"] == [
                "CMD", "python", "-m", "client", "health", "--server", f"127.0.0.1:{port}",
            ], name  # fmt: skip
            assert merged["shm_size"], name
        else:
            assert merged["healthcheck"]["test"] == [
                "CMD", "python", "-m", "gateway.health_check", f"127.0.0.1:{port}",
            ], name  # fmt: skip
        assert merged["restart"] in {"unless-stopped", "always", "on-failure", "no"}, name
        assert merged["stop_grace_period"], name


@pytest.mark.parametrize("override", [None, GPU, TEST], ids=["cpu", "gpu", "test"])
def test_each_command_is_accepted_by_its_services_parser(override):
    merged = {**services(BASE), **(services(override) if override else {})}
    diffusion = command({**services(BASE)["diffusion"], **merged["diffusion"]})
    prefill = command({**services(BASE)["prefill"], **merged["prefill"]})
    assert diffusion[:3] == ["python", "-m", "diffusion_service"]
    assert prefill[:3] == ["python", "-m", "prefill_service"]
    settings = parse_settings(diffusion[3:])
    assert settings.model_dir == "/models/bagel"
    assert parse_prefill_settings(prefill[3:]).model_dir == "/models/bagel"
    port = flag(diffusion, "--listen").rsplit(":", 1)[1]
    assert flag(prefill, "--diffusion").endswith(f":{port}")
    gateway = command({**services(BASE)["gateway"], **merged["gateway"]})
    assert gateway[:3] == ["python", "-m", "gateway"]
    gateway_settings = parse_gateway_settings(gateway[3:])
    assert gateway_settings.prefill.endswith(":" + flag(prefill, "--listen").rsplit(":", 1)[1])


def test_the_gateway_publishes_http_on_the_loopback_after_the_prefill_service_is_healthy():
    gateway = services(BASE)["gateway"]
    port = flag(command(gateway), "--listen").rsplit(":", 1)[1]
    assert gateway["ports"] == [f"${{GATEWAY_PUBLISH:-127.0.0.1:{port}}}:{port}"]
    assert gateway["depends_on"] == {"prefill": {"condition": "service_healthy"}}


def test_the_test_override_keeps_every_service_on_the_host_network_and_the_loopback():
    base, test = services(BASE), services(TEST)
    assert test["diffusion"]["build"]["network"] == "host"  # the build makes no bridge either
    for name in base:
        service = test[name]
        assert service["network_mode"] == "host", name
        for key in ("networks", "ports"):  # host networking admits neither
            assert isinstance(service[key], Reset) and service[key].tag == "!reset", (name, key)
        argv = command(service)
        for address_flag in ADDRESS_FLAGS:
            if address_flag in argv:
                assert flag(argv, address_flag).startswith("127.0.0.1:"), (name, address_flag)
        if name in MODEL_SERVICES:  # the gateway's metrics are on its own port
            assert flag(argv, "--metrics-host") == "127.0.0.1", name
        assert service["healthcheck"]["test"][-1].startswith("127.0.0.1:"), name


def test_the_test_script_talks_to_the_addresses_the_test_override_serves_on():
    script = (ROOT / "scripts" / "compose_test.sh").read_text()
    test = services(TEST)
    listens = {name: flag(command(test[name]), "--listen") for name in SERVICES}
    assert f"PREFILL={listens['prefill']}\n" in script
    assert f"DIFFUSION={listens['diffusion']}\n" in script
    assert f"GATEWAY={listens['gateway']}\n" in script
    assert "phase http generate_http" in script  # one image over HTTP, through the gateway


def test_the_gpu_override_reserves_gpus_shares_ipc_and_takes_the_topology_from_the_environment():
    gpu = services(GPU)
    diffusion = gpu["diffusion"]
    assert diffusion["ipc"] == "host"
    assert gpu["gateway"]["image"] == diffusion["image"]  # the CUDA image, needing no GPU
    for service in (gpu[name] for name in MODEL_SERVICES):
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert flag(command(service), "--device") == "cuda"
    for variable, option in [
        ("ULYSSES", "--ulysses"),
        ("RING", "--ring"),
        ("CFG_PARALLEL", "--cfg-parallel"),
        ("KV_GATHER", "--kv-gather"),
    ]:
        assert f"{option} ${{{variable}:-1}}" in " ".join(diffusion["command"].split())
    assert diffusion["environment"]["NCCL_NVLS_ENABLE"].endswith("0}")
    assert "cu" in diffusion["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[1]


def docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    found = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return [docker, "compose"] if found.returncode == 0 else None


@pytest.mark.skipif(docker_compose() is None, reason="docker compose is not installed")
def test_compose_itself_resolves_the_test_configuration_to_host_networking_only():
    result = subprocess.run(
        [*docker_compose(), "-f", str(BASE), "-f", str(TEST), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    config = json.loads(result.stdout)
    assert set(config["services"]) == SERVICES
    for name, service in config["services"].items():
        assert service["network_mode"] == "host", name
        assert not service.get("networks") and not service.get("ports"), name
    assert not config.get("networks")


def test_every_product_package_is_in_the_build_context_and_copied_into_the_image():
    """The image installs what `pyproject.toml` packages: each package must pass `.dockerignore`
    (a whitelist) and have its `COPY` in the Dockerfile, or the build fails (or, worse, the
    package is missing at run time)."""
    import tomllib

    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    allowed = set((ROOT / ".dockerignore").read_text().splitlines())
    copied = set(re.findall(r"^COPY (\w+) /src/\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages, includes
    for package in sorted(packages):
        assert f"!{package}/" in allowed, f".dockerignore leaves {package}/ out of the context"
        assert package in copied, f"the Dockerfile does not COPY {package}"
