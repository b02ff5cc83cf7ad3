"""Commands that reports and the journal print for the reader to run next, written so that they run as
printed: the spec by a name ``fuselab compare`` can load, and the store whenever it is not the default.

Which spec argument names an experiment, first that applies:

1. the spec file that ``fuselab compare`` last ran for it, recorded in
   ``<store>/<experiment>/spec-source.json`` (when the file is still there);
2. the shipped spec of the same name (``fuselab list specs``);
3. a copy of the spec as the store holds it, written to ``<store>/<experiment>/spec.yaml``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

__all__ = ["DEFAULT_STORE", "SOURCE_FILE", "command", "record_spec_source", "spec_argument", "store_args"]

DEFAULT_STORE = Path("runs")  # ``--store`` of every command when not given
SOURCE_FILE = "spec-source.json"


def _experiment_dir(store: str | Path, experiment: str) -> Path:
    from fuselab.experiments.spec import check_experiment_name

    return Path(store) / check_experiment_name(experiment)


def record_spec_source(store: str | Path, experiment: str, spec: str) -> None:
    """Remember which spec file ``fuselab compare`` ran for ``experiment`` (nothing for a shipped name)."""
    from fuselab.experiments.spec import shipped_specs

    path = Path(spec)
    if spec in shipped_specs() and not path.is_file():
        return
    folder = _experiment_dir(store, experiment)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SOURCE_FILE}.tmp"
        tmp.write_text(json.dumps({"spec": str(path.resolve())}))
        tmp.replace(folder / SOURCE_FILE)
    except OSError:  # a read-only store still trains; its commands fall back to the stored copy
        pass


def spec_argument(store: str | Path, experiment: str) -> str:
    """The spec argument of ``fuselab compare`` that runs ``experiment`` again (see the module docstring)."""
    from fuselab.experiments.spec import shipped_specs

    folder = _experiment_dir(store, experiment)
    try:
        recorded = Path(json.loads((folder / SOURCE_FILE).read_text())["spec"])
        if recorded.is_file():
            return str(recorded)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if experiment in shipped_specs():
        return experiment
    copy = folder / "spec.yaml"
    if not copy.is_file():
        import yaml

        from fuselab.experiments.store import Store
        from fuselab.errors import ConfigError

        st = Store(store)
        if not st.exists():
            return "SPEC.yaml"  # no store to take the spec from: the reader has to supply the file
        try:
            spec = st.experiment(experiment)["spec"]
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(yaml.safe_dump(dict(spec), sort_keys=False, allow_unicode=True), encoding="utf-8")
        except (OSError, ConfigError):
            return "SPEC.yaml"  # an unknown experiment, or nowhere to write the copy
    return str(copy)


def store_args(store: str | Path) -> list[str]:
    """``["--store", STORE]`` unless ``store`` is the default."""
    return [] if Path(store) == DEFAULT_STORE else ["--store", str(store)]


def command(*words: str) -> str:
    """``fuselab WORDS...`` quoted for a POSIX shell."""
    return shlex.join(["fuselab", *words])
