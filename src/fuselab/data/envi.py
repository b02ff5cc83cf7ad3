"""A small reader for ENVI raster files (a raw binary file plus a text ``.hdr`` / ``.HDR`` header).

Legend: b bands, h lines (rows), w samples (columns).

The header's ``samples``, ``lines``, ``bands``, ``data type``, ``interleave`` (bsq, bil, bip), ``byte order``
and ``header offset`` are honoured. The file must hold exactly ``header offset + b h w * itemsize`` bytes; anything else is a header that does
not describe the file, reported in one line.

Why not rasterio/GDAL: it installs, but it reads a file shorter than its header says as if the missing part
were zeros (no error), and it brings about 100 MB of GDAL for a format that is a header and a raw array.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# ENVI data type codes -> numpy dtypes (without byte order)
DATA_TYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 6: "c8", 9: "c16", 12: "u2", 13: "u4", 14: "i8", 15: "u8"}
INTERLEAVES = ("bsq", "bil", "bip")


class EnviError(ValueError):
    """An ENVI file that cannot be read as its header describes (one line)."""


def find_header(path: str | Path) -> Path:
    """The header of a raster: ``<path>.hdr`` / ``.HDR`` or the path with its suffix replaced."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix else path
    for candidate in (
        Path(f"{path}.hdr"), Path(f"{path}.HDR"), stem.with_name(stem.name + ".hdr"), stem.with_name(stem.name + ".HDR")
    ):
        if candidate.is_file() and candidate != path:
            return candidate
    raise EnviError(f"ENVI image '{path}' has no header: expected {path.name}.hdr or {path.name}.HDR beside it")


def parse_header(text: str, where: str = "header") -> dict[str, str]:
    """``key = value`` pairs of an ENVI header (keys lower-cased; ``{...}`` values may span lines)."""
    if not text.lstrip().upper().startswith("ENVI"):
        raise EnviError(f"{where} is not an ENVI header (it must start with 'ENVI')")
    fields: dict[str, str] = {}
    for match in re.finditer(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, flags=re.MULTILINE):
        fields[match.group(1).strip().lower()] = match.group(2).strip()
    return fields


def _int_field(fields: dict[str, str], key: str, where: str, default: int | None = None) -> int:
    if key not in fields:
        if default is not None:
            return default
        raise EnviError(f"{where} has no '{key}' field")
    try:
        return int(fields[key])
    except ValueError:
        raise EnviError(f"{where}: '{key}' must be an integer, got {fields[key]!r}") from None


def read_envi(path: str | Path) -> np.ndarray:
    """An ENVI image as an array (bands, lines, samples) in the file's data type (native byte order)."""
    path = Path(path)
    if not path.is_file():
        raise EnviError(f"ENVI image '{path}' does not exist")
    header = find_header(path)
    where = f"ENVI header '{header}'"
    fields = parse_header(header.read_text(errors="replace"), where)
    samples, lines, bands = (_int_field(fields, k, where) for k in ("samples", "lines", "bands"))
    if min(samples, lines, bands) < 1:
        raise EnviError(f"{where}: samples, lines and bands must be positive, got {samples}, {lines}, {bands}")
    code = _int_field(fields, "data type", where)
    if code not in DATA_TYPES:
        raise EnviError(f"{where}: unsupported data type {code}; supported: {sorted(DATA_TYPES)}")
    interleave = fields.get("interleave", "bsq").strip().lower()
    if interleave not in INTERLEAVES:
        raise EnviError(f"{where}: interleave must be bsq, bil or bip, got {interleave!r}")
    order = _int_field(fields, "byte order", where, default=0)
    if order not in (0, 1):
        raise EnviError(f"{where}: byte order must be 0 (little endian) or 1 (big endian), got {order}")
    offset = _int_field(fields, "header offset", where, default=0)
    dtype = np.dtype(("<" if order == 0 else ">") + DATA_TYPES[code])
    expected = offset + samples * lines * bands * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise EnviError(
            f"{where} does not match '{path.name}': {bands} bands x {lines} lines x {samples} samples of "
            f"{dtype.itemsize} byte(s) + offset {offset} = {expected} bytes, but the file has {actual}"
        )
    flat = np.fromfile(path, dtype=dtype, offset=offset)
    if interleave == "bsq":
        cube = flat.reshape(bands, lines, samples)
    elif interleave == "bil":
        cube = flat.reshape(lines, bands, samples).transpose(1, 0, 2)
    else:
        cube = flat.reshape(lines, samples, bands).transpose(2, 0, 1)
    return np.ascontiguousarray(cube.astype(dtype.newbyteorder("="), copy=False))


def write_envi(path: str | Path, cube: np.ndarray, *, interleave: str = "bsq", byte_order: int = 0,
               header_offset: int = 0, header_suffix: str = ".hdr") -> None:
    """Write ``cube`` (bands, lines, samples) as an ENVI file (for tests and for users' own data)."""
    codes = {np.dtype(v).str[1:]: k for k, v in DATA_TYPES.items()}
    kind = np.dtype(cube.dtype).str[1:]
    if kind not in codes:
        raise EnviError(f"cannot write data type {cube.dtype} as ENVI")
    bands, lines, samples = cube.shape
    axes = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}[interleave]
    data = np.ascontiguousarray(cube.transpose(axes)).astype(np.dtype(("<" if byte_order == 0 else ">") + kind))
    path = Path(path)
    path.write_bytes(b"\0" * header_offset + data.tobytes())
    Path(f"{path}{header_suffix}").write_text(
        f"ENVI\nsamples = {samples}\nlines   = {lines}\nbands   = {bands}\nheader offset = {header_offset}\n"
        f"file type = ENVI Standard\ndata type = {codes[kind]}\ninterleave = {interleave}\nbyte order = {byte_order}\n"
    )
