"""Plugins: a user's fusion and loss next to the built-ins, in the same table."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

from fuselab.plugins import load_plugin
from fuselab.train.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my-idea"


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken_idea.py"
    bad.write_text("import torch\nraise RuntimeError('half-written idea')\n")
    with pytest.raises(ConfigError, match=r"plugin '.*broken_idea.py' failed to import: RuntimeError: half-written idea"):
        load_plugin(str(bad))
    code, _, err = _cli(capsys, "list", "fusions", "--plugin", str(bad))
    assert code == 2 and "broken_idea.py" in err and len(err.strip().splitlines()) == 1


def test_a_plugin_that_registers_an_existing_id_is_one_line(tmp_path):
    dup = tmp_path / "dup_idea.py"
    dup.write_text(textwrap.dedent("""
        from fuselab import register_fusion
        from fuselab.fusion.basic import Concat

        @register_fusion("concat")
        class MyConcat(Concat):
            pass
    """))
    with pytest.raises(ConfigError, match=r"plugin '.*dup_idea.py': fusion 'concat' is already registered"):
        load_plugin(str(dup))


def test_missing_plugin_file(capsys):
    code, _, err = _cli(capsys, "list", "--plugin", "no_such_idea.py")
    assert code == 2 and "plugin 'no_such_idea.py' not found" in err


def test_plugin_ids_are_listed_and_usable_in_a_run(capsys):
    code, out, _ = _cli(capsys, "list", "fusions", "--plugin", str(EXAMPLE / "my_idea.py"))
    assert code == 0 and "gated-sum" in out
    code, out, _ = _cli(capsys, "list", "losses", "--plugin", str(EXAMPLE / "my_idea.py"))
    assert "confidence-penalty" in out


def _tiny_spec(tmp_path: Path, plugin: Path) -> Path:
    spec = yaml.safe_load((EXAMPLE / "my-idea.yaml").read_text())
    spec["name"] = "my-idea-tiny"
    spec["plugins"] = [plugin.name]
    spec["base"]["data"]["views"] = ["fou", "kar"]
    spec["base"]["model"]["hidden"] = 32
    spec["base"]["train"] = {"epochs": 3, "batch_size": 64, "lr": 5.0e-3}
    spec["grid"] = {"fusion.name": ["concat", "gated-sum"]}
    spec["variants"] = []
    spec["seeds"] = [0]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_with_a_plugin_in_worker_processes_and_a_changed_plugin_reruns(tmp_path):
    plugin = tmp_path / "my_idea.py"
    plugin.write_text((EXAMPLE / "my_idea.py").read_text())
    spec = _tiny_spec(tmp_path, plugin)
    cmd = [sys.executable, "-m", "fuselab.cli", "compare", str(spec), "--store", str(tmp_path / "store"), "--jobs", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "2 trained" in first.stdout and "gated-sum" in first.stdout
    plugin.write_text(plugin.read_text() + "\n# the idea changed\n")
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "1 trained, 1 already in the store" in second.stdout  # concat is cached, gated-sum re-runs
