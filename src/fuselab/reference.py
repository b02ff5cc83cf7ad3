"""Reference pages generated from the code, so the user guide never drifts from it.

``python -m fuselab.reference docs/reference`` writes ``config.md`` (every run-config and spec key with its
default, from the config dataclasses and the registered builders' signatures) and ``operators.md`` (the
fusion catalogue from ``fusion_info``). A test regenerates both and compares them with the committed files.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fuselab.train.config as config_module
from fuselab.api import fusion_info, list_fusions
from fuselab.experiments.spec import SPEC_HELP
from fuselab.plugins import from_plugin
from fuselab.registry import DATASETS, LOSSES, MODELS

_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+?(?:=\s*(.+?))?\s*(?:#\s*(.*))?$")
def _field_comments(cls: type) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m and m.group(3):
            comments[m.group(1)] = m.group(3).strip()
    return comments


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _doc_args(fn: Callable[..., Any]) -> dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` block (continuation lines joined)."""
    doc = inspect.getdoc(fn) or ""
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            if not line.strip() or (not line.startswith(" ") and line.strip().endswith(":")):
                in_args = line.strip() != "" and in_args and line.startswith(" ")
                current = None
                continue
            m = re.match(r"^\s{2,8}([\w/ ]+?):\s*(.*)$", line)
            if m and " " not in m.group(1).strip().replace(" / ", "/"):
                for name in m.group(1).split("/"):
                    current = name.strip()
                    out[current] = m.group(2).strip()
            elif current:
                out[current] += " " + line.strip()
    return out


def _fmt(value: Any) -> str:
    return "`" + repr(value).replace("|", "\\|") + "`"


def _builder_table(name: str, fn: Callable[..., Any], injected: set[str]) -> list[str]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    helps = _doc_args(fn)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for pname, p in inspect.signature(target).parameters.items():
        if pname in injected | {"self"} or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = "required" if p.default is inspect.Parameter.empty else _fmt(p.default)
        rows.append(f"| `{pname}` | {default} | {helps.get(pname, '').replace('|', '/')} |")
    return rows


def config_reference() -> str:
    lines = ["# Config and spec reference", "",
             "Generated from the code by `python -m fuselab.reference docs/reference`; do not edit by hand.", "",
             "A run config has the sections below; a YAML file gives any of them and `key=value` overrides",
             "(`train.epochs=20`, `fusion.name=lmf`) change single keys. Unknown keys and wrong types are errors.", ""]
    for section, cls in (("train", config_module.TrainConfig), ("loss", config_module.LossConfig)):
        comments = _field_comments(cls)
        lines += [f"## `{section}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = comments.get(f.name, "").replace("|", "/")
            lines.append(f"| `{section}.{f.name}` | {_fmt(_default(f))} | {meaning} |")
        lines.append("")
    lines += ["## `seed`", "", "An integer (default `0`): fixes the data split, the initialisation and the batch order.", ""]
    injected = config_module._INJECTED
    for section, registry in (("data", DATASETS), ("model", MODELS)):
        lines += [f"## `{section}`", "", f"`{section}.name` picks a registered {registry.kind}; its options are:", ""]
        for name in [n for n in registry.list() if not from_plugin(registry.kind, n)]:  # built-ins only
            lines += [f"### `{section}.name: {name}`", "", *_builder_table(name, registry.get(name), injected[section]), ""]
    lines += ["## `fusion` and `exchange`", "",
              "`fusion.name` picks a merge, `exchange.name` an exchange (models that take one); the other keys are the",
              "operator's options, listed in the [operator catalogue](operators.md).", "",
              "## `loss.terms`", "", "A list of `{name, weight, options...}`; the loss is the weighted sum.", ""]
    for name in [n for n in LOSSES.list() if not from_plugin("loss", n)]:
        fn = LOSSES.get(name)
        first = (inspect.getdoc(fn) or "").splitlines()[0] if inspect.getdoc(fn) else ""
        params = [f"`{p}` = {_fmt(v.default)}" for p, v in inspect.signature(fn).parameters.items()
                  if v.default is not inspect.Parameter.empty]
        lines.append(f"- `{name}`: {first}" + (f" Options: {', '.join(params)}." if params else ""))
    lines += ["", "## Spec keys", "", "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {text} |" for k, text in SPEC_HELP.items()]
    return "\n".join(lines) + "\n"


def operator_catalogue() -> str:
    lines = ["# Operator catalogue", "",
             "Generated from `fuselab.fusion_info` by `python -m fuselab.reference docs/reference`; do not edit by hand.", "",
             "| id | contract | forms | missing modality | natural width |", "|---|---|---|---|---|"]
    infos = [fusion_info(i) for i in list_fusions() if not from_plugin("fusion", i)]  # built-ins only
    for info in infos:
        contract = info.contract if info.kind == "merge" else f"{info.contract} ({info.kind})"
        lines.append(f"| [`{info.id}`](#{info.id}) | {contract} | {', '.join(info.forms)} | "
                     f"{'yes' if info.supports_missing else 'no'} | {info.natural_out_dim or 'same as input'} |")
    for info in infos:
        options = ", ".join(f"`{k}={v!r}`" for k, v in info.options.items()) or "none"
        lines += ["", f"## {info.id}", "",
                  f"- **Formula:** `{info.formula}`",
                  f"- **More than two modalities:** {info.multimodal_rule}",
                  f"- **Paper:** {info.paper}",
                  f"- **Reference implementation:** {info.reference}",
                  f"- **Options:** {options}"]
    return "\n".join(lines) + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in (("config.md", config_reference()), ("operators.md", operator_catalogue())):
        path = folder / name
        path.write_text(text)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reference")):
        print(p)
