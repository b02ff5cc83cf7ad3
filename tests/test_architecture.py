"""The house's layering: import-linter contracts (pyproject.toml) and what ``import fuselab`` loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """cli > report > experiments > train > models > operators and data > registry, errors; no module
    imports from a layer above its own, siblings do not import each other (no cycles among them)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extras (pip install -e '.[dev]')")
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
    kept = int(done.stdout.split("Contracts:")[1].split("kept")[0])
    assert kept >= 4  # the four contracts of pyproject.toml (none silently dropped)


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter (one that has imported nothing yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_fuselab_stays_below_the_run_and_store_layers():
    """``import fuselab`` registers every built-in part but loads neither Lightning, the run layer nor the
    store; ``load_run`` and ``load_results`` load theirs on first use."""
    code = (
        "import sys, fuselab\n"
        "heavy = [m for m in ('lightning_fabric', 'fuselab.train.config', 'fuselab.train.session', "
        "'fuselab.experiments.store', 'optuna', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)\n"
        "print(len(fuselab.DATASETS.list()) >= 7, 'mbt' in fuselab.MODELS.list(), 'concat' in fuselab.FUSIONS.list())\n"
        "from fuselab import load_run, ConfigError\n"
        "print(load_run.__module__, ConfigError.__module__)\n"
    )
    assert _fresh_python(code).splitlines() == ["[]", "True True True", "fuselab.train.session fuselab.errors"]


def test_config_error_is_one_class_everywhere():
    """The leaf ``fuselab.errors.ConfigError`` is the class every layer raises and the CLI catches."""
    import fuselab
    from fuselab.errors import ConfigError
    from fuselab.train import config

    assert config.ConfigError is ConfigError is fuselab.ConfigError
    with pytest.raises(ConfigError, match="unknown config section 'base'"):
        config.make_config({"base": {}})


def test_the_command_line_holds_no_sql_and_no_list_of_model_ids():
    """The CLI asks the store (``Store.done_ids``) and the registry (a builder's ``own_fusion``) instead of
    holding SQL or a hard-coded list of models."""
    from fuselab.registry import MODELS

    source = (ROOT / "src" / "fuselab" / "cli.py").read_text()
    assert "SELECT" not in source and "sqlite3.connect" not in source
    assert '"cen", "cva"' not in source
    assert [m for m in MODELS.list() if getattr(MODELS.get(m), "own_fusion", False)] == ["cen", "cva"]


def test_reading_a_spec_loads_neither_lightning_nor_matplotlib():
    """Checking a spec (every method's config, the trackers it names) stays light: a read-only store is
    refused before Lightning, torchmetrics or matplotlib (which wants a writable config folder) load."""
    code = (
        "import sys\n"
        "from fuselab.experiments.spec import load_spec\n"
        "load_spec('mfeat-compare').plan()\n"
        "print([m for m in ('lightning_fabric', 'torchmetrics', 'matplotlib') if m in sys.modules])\n"
    )
    assert _fresh_python(code).strip() == "[]"
