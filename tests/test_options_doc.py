"""docs/options.md lists every option of every command, as the parser declares them."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ddpm_cars.cli import build_parser

ROOT = Path(__file__).parents[1]
TOOL = ROOT / "tools" / "options_doc.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("options_doc", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


options_doc = _load_tool()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_options_page_is_current():
    expected = options_doc.render(build_parser())
    assert options_doc.DOC.read_text(encoding="utf-8") == expected, (
        "docs/options.md differs from the option declarations: run `python tools/options_doc.py`"
    )


def test_check_command_passes_without_loading_torch():
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('options_doc', {str(TOOL)!r})\n"
        "tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)\n"
        "tool.render(tool.build_parser())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_option_of_every_command_is_on_the_page():
    parser = build_parser()
    page = options_doc.render(parser)
    commands = options_doc.subcommands(parser)
    assert len(commands) >= 10 and {"train", "sample", "eval", "bench"} <= set(commands)
    for name, sub in commands.items():
        assert f"\n## `ddpm-cars {name}`\n" in page, name
        section = page.split(f"\n## `ddpm-cars {name}`\n")[1].split("\n## ")[0]
        actions = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        assert actions or name == "classes", name
        for action in actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                assert f"`{flag}" in section, f"{name} {flag} is not on the page"
            if not action.option_strings:
                assert f"`{action.metavar or action.dest}`" in section, f"{name} {action.dest} is not on the page"
            first_words = " ".join(action.help.split()[:3]).replace("|", "\\|")
            assert first_words in section, (
                f"the help of {name} {action.option_strings or action.dest} is not on the page"
            )
        assert "--help" not in [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]


def test_a_changed_declaration_changes_the_page(tmp_path, monkeypatch, capsys):
    current = options_doc.render(build_parser())

    parser = build_parser()
    options_doc.subcommands(parser)["forward"].add_argument(
        "--gamma", choices=["a|b", "c"], help="an extra option (default: %(default)s)"
    )
    page = options_doc.render(parser)
    assert page != current
    assert "| `--gamma {a\\|b,c}` | an extra option (default: None) |" in page

    parser = build_parser()
    steps = next(a for a in options_doc.subcommands(parser)["demo"]._actions if "--steps" in a.option_strings)
    steps.help = "a different help"
    assert options_doc.render(parser) != current

    stale = tmp_path / "options.md"
    stale.write_text(current.replace("--steps", "--stepz", 1), encoding="utf-8")
    monkeypatch.setattr(options_doc, "DOC", stale)
    assert options_doc.main(["--check"]) == 1
    message = capsys.readouterr().err
    assert "docs/options.md" in message and "python tools/options_doc.py" in message and message.count("\n") == 1
    stale.write_text(current, encoding="utf-8")
    assert options_doc.main(["--check"]) == 0
    stale.unlink()
    assert options_doc.main([]) == 0 and stale.read_text(encoding="utf-8") == current
