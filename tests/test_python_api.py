"""The README's Python section, run as written: the commands are functions of typed requests."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks("Using it from Python")
    assert len(blocks) == 2 and "from ddpm_cars.commands import" in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    assert (tmp_path / "runs/api/config.json").is_file() and (tmp_path / "samples/api/grid.png").is_file()
    assert len(list((tmp_path / "samples/api/images").iterdir())) == 16
    assert tuple(scope["images"].shape) == (16, 3, 16, 16) and tuple(scope["variations"].shape) == (8, 3, 16, 16)
    assert scope["images"].abs().max() <= 1 and scope["variations"].std() > 0.05  # images, not a constant
    assert "Wrote 16 images" in capsys.readouterr().out  # the command's closing line
