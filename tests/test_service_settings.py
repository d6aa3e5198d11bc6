"""Every service's settings are one dataclass: each field (its groups' included) is one flag of
the service's parser and each flag one field, `--help` shows each field's help and default, and
a bad flag ends the process with one line and exit status 2. Derived from the dataclasses."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest

from diffusion_service.settings import ServiceSettings
from gateway.settings import GatewaySettings
from prefill_service.mock import MockPrefillSettings
from prefill_service.settings import ModelPrefillSettings, size_pair
from serving import flags
from serving.params import CACHE_SPEC
from serving.service.security import INSECURE_TOKEN_FLAG, client_names

SERVICES: dict[str, type] = {
    "diffusion_service": ServiceSettings,
    "prefill_service": ModelPrefillSettings,
    "prefill_service.mock": MockPrefillSettings,
    "gateway": GatewaySettings,
}
# Text for each parser a field names (`option(parse=...)`), and what it gives.
SAMPLES = {
    CACHE_SPEC.parse: "dbcache:fn=4,warmup=8,threshold=0.2",
    size_pair: "640,320",
    client_names: "prefill,gateway",
}


def parser(name: str) -> Any:
    return flags.build_parser(SERVICES[name], f"python -m {name}")


def leaf_fields(cls: type, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every field that is a value, not a group or one the environment sets."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            leaves += leaf_fields(hints[f.name], (*path, f.name))
        elif "detect" not in f.metadata:
            leaves.append((*path, f.name))
    return leaves


def at(settings: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        settings = getattr(settings, name)
    return settings


def spelled(flag: flags.Flag) -> str:
    """The option string: a switch that is on by default is cleared by `--no-...`."""
    if flag.field.default is True:
        return "--no-" + flag.name.removeprefix("--")
    return flag.name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_field_is_one_flag_and_every_flag_one_field(name: str):
    cls = SERVICES[name]
    found = list(flags.flags(cls))
    assert sorted(f.path for f in found) == sorted(leaf_fields(cls))
    names = [spelled(f) for f in found]
    assert len(set(names)) == len(names)
    actions = parser(name)._actions
    options = {a.option_strings[0] for a in actions if a.option_strings} - {"-h"}
    assert options == set(names)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_flag_sets_its_own_field(name: str):
    """All flags at once, each with a value of its own: each lands in its field."""
    cls = SERVICES[name]
    argv, want = [], {}
    for i, flag in enumerate(flags.flags(cls)):
        (kind, choices), default = flag.kind, flag.default
        if kind is bool:
            argv.append(spelled(flag))
            want[flag.path] = not default
            continue
        if kind in SAMPLES:
            text = SAMPLES[kind]
        elif choices:
            text = next(c for c in reversed(choices) if c != default)
        elif kind is str:
            text = f"h{i}:{100 + i}"
        else:
            text = str(kind(1000 + i) + (0.5 if kind is float else 0))
        argv += [flag.name, text]
        want[flag.path] = kind(text)
    settings = flags.parse_settings(cls, f"python -m {name}", argv)
    assert {path: at(settings, path) for path in want} == want


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_help_lists_each_fields_help_and_its_default(name: str):
    cls = SERVICES[name]
    text = " ".join(parser(name).format_help().split())
    assert " ".join(inspect.getdoc(cls).split()) in text  # the description
    for flag in flags.flags(cls):
        help = " ".join(flag.help.split())
        assert help in text, (flag.name, help)
        assert "{peer}" not in help
        if flag.default is not None and not isinstance(flag.default, bool):
            assert "(default" in text.split(help, 1)[1][:40] or "(default" in help, flag.name


def test_the_device_default_is_shown():
    text = " ".join(parser("diffusion_service").format_help().split())
    assert "(bf16, one GPU per rank) (default: cpu)" in text


def test_the_insecure_token_flag_is_a_field_of_every_service():
    for cls in SERVICES.values():
        assert INSECURE_TOKEN_FLAG in {f.name for f in flags.flags(cls)}, cls


@pytest.mark.parametrize("name", sorted(SERVICES))
@pytest.mark.parametrize("bad", [["--bogus"], ["--listen"], ["--metrics-port", "x"]])
def test_a_bad_flag_ends_with_one_line_and_exit_2(name: str, bad: list[str], capsys):
    cls = SERVICES[name]
    if bad[0] == "--metrics-port" and name == "gateway":
        bad = ["--max-concurrency", "x"]
    required = ["--model", "m"] if "model_dir" in {f.name for f in dataclasses.fields(cls)} else []
    with pytest.raises(SystemExit) as exited:
        flags.parse_settings(cls, name, [*required, *bad])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err


def test_the_diffusion_service_reads_torchrun_from_the_environment(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    parse = lambda: flags.parse_settings(ServiceSettings, "prog", ["--model", "m"])  # noqa: E731
    assert parse().torchrun is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    assert parse().torchrun is True
