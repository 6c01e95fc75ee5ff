"""``sparse-parallel pattern show`` draws a PNG and prints the exact description."""
import json

import pytest
import yaml

import sparse_parallel as sp
from sparse_parallel.launcher.cli import main


def test_pattern_show_writes_png_and_describes(tmp_path, capsys):
    out = tmp_path / "p.png"
    rc = main(["pattern", "show", "window:left=8", "strided:stride=16,span=64", "global:first=4,queries=false",
               "--n", "200", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("{"):])
    p = sp.Window(8) | sp.Strided(16, span=64) | sp.Global(first=4, queries=False)
    assert printed["describe"]["pairs"] == int(p.mask(200).sum())
    assert sp.Pattern.from_dict(printed["pattern"]) == p


def test_pattern_show_reads_yaml_file(tmp_path, capsys):
    f = tmp_path / "pattern.yaml"
    f.write_text(yaml.safe_dump({"pattern": sp.Pattern(sp.Dilated(4, 2), causal=False).to_dict()}))
    assert main(["pattern", "show", "--file", str(f), "--n", "50"]) == 0
    assert '"causal": false' in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["pattern", "show", "window:left=-3"], "Window.left"),
    (["pattern", "show", "ring:size=3"], "unknown component type"),
    (["pattern", "show", "--file", "/nonexistent/p.yaml"], "does not exist"),
])
def test_pattern_show_bad_input(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_pattern_show_takes_the_dilated_shorthand_and_lists_it(capsys):
    assert main(["pattern", "show", "window:left=8", "dilated:window=4,levels=2", "--n", "64"]) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("{"):])
    p = sp.Window(8) | sp.Dilated(4, 2)
    assert printed["describe"]["pairs"] == int(p.mask(64).sum())
    from sparse_parallel.launcher.pattern_cmd import components_help
    assert "dilated: window (required), levels (required), growth=2" in components_help()
