"""Both services' `--help` states every option's default (or says what unset means)."""

from __future__ import annotations

import argparse

import pytest

from diffusion_service.settings import build_parser as diffusion_parser
from prefill_service.settings import build_parser as prefill_parser
from serving.settings import DefaultsHelpFormatter

PARSERS = {
    "diffusion_service": diffusion_parser,
    "prefill_service": lambda: prefill_parser("python -m prefill_service", "prefill"),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_with_a_default_states_it(name: str):
    parser = PARSERS[name]()
    formatter = DefaultsHelpFormatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue
        if action.default is None:  # unset means off; the help says what setting it does
            continue
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert "(default" in shown, (action.option_strings, shown)


def test_the_device_default_is_shown():
    text = diffusion_parser().format_help()
    assert "(bf16, one GPU per rank) (default: cpu)" in " ".join(text.split())


def test_a_help_that_states_its_default_gets_no_second_one():
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--a", default=1, help="a number (default: one)")
    parser.add_argument("--b", default=2, help="b")
    parser.add_argument("--c", help="c")
    text = " ".join(parser.format_help().split())
    assert "a number (default: one) --b" in text
    assert "b (default: 2)" in text and "c (default" not in text
