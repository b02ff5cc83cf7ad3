"""Georeferencing of rasters: ENVI ``map info``, GeoTIFF reading and writing (rasterio, the ``geo`` extra).

Legend: b bands, h lines (rows), w samples (columns).

A :class:`Georef` is what a GeoTIFF needs to place a raster on the ground: the affine transform from
pixel (column, row) to map (x, y) coordinates, as the six coefficients ``(a, b, c, d, e, f)`` of
``x = a col + b row + c`` and ``y = d col + e row + f`` (the order of the ``affine`` package that rasterio
uses), and the coordinate reference system (``EPSG:<code>`` or a WKT string).

ENVI's ``map info`` is ``{projection, reference x, reference y, easting, northing, pixel x, pixel y,
[zone, North|South,] datum, units=...}``: the map coordinates (easting, northing) of the 1-based pixel
position (reference x, reference y), where (1, 1) is the upper-left corner of the upper-left pixel
(ENVI header format documentation, "map info"; GDAL's ENVI driver reads it the same way). Rotated grids
(``rotation=``) are refused in one line rather than placed wrongly.

rasterio is only imported to read or write GeoTIFFs; parsing ENVI headers needs nothing beyond numpy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from fuselab.data.envi import EnviError, find_header, parse_header, read_envi
from fuselab.errors import ConfigError

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".gtiff")
GEO_EXTRA = "pip install 'fuselab[geo]'"


def require_rasterio(what: str) -> Any:
    """The rasterio module, or one line naming the extra that installs it."""
    try:
        import rasterio
    except ImportError:
        raise ConfigError(f"{what} needs rasterio, which is not installed; {GEO_EXTRA} (or pip install rasterio)") from None
    return rasterio


@dataclasses.dataclass(frozen=True)
class Georef:
    """Where a raster lies: an affine ``transform`` (a, b, c, d, e, f) and a ``crs`` (``EPSG:<code>`` or WKT)."""

    transform: tuple[float, float, float, float, float, float]
    crs: str | None = None

    def crop(self, row: int, col: int) -> "Georef":
        """The georeference of the window whose upper-left pixel is (``row``, ``col``) of this raster."""
        a, b, c, d, e, f = self.transform
        return Georef((a, b, c + a * col + b * row, d, e, f + d * col + e * row), self.crs)


def is_geotiff(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GEOTIFF_SUFFIXES


def _map_info_items(value: str) -> list[str]:
    return [item.strip() for item in value.strip().strip("{}").split(",")]


def parse_map_info(value: str, coordinate_system: str | None = None, where: str = "map info") -> Georef:
    """A :class:`Georef` from the value of an ENVI ``map info`` field (``{UTM, 1, 1, 203325, ...}``) and,
    when given, the header's ``coordinate system string`` (WKT)."""
    items = _map_info_items(value)
    if len(items) < 7:
        raise EnviError(f"{where}: 'map info' needs at least 7 values (projection, reference pixel, "
                        f"easting, northing, pixel size), got {len(items)}")
    try:
        ref_x, ref_y, easting, northing, size_x, size_y = (float(v) for v in items[1:7])
    except ValueError:
        raise EnviError(f"{where}: 'map info' values 2 to 7 must be numbers, got {', '.join(items[1:7])}") from None
    for item in items[7:]:
        if item.lower().startswith("rotation") and float(item.split("=", 1)[1]) % 360:
            raise EnviError(f"{where}: rotated map grids ({item}) are not supported; resample the image to a north-up grid")
    c = easting - (ref_x - 1) * size_x
    f = northing + (ref_y - 1) * size_y
    return Georef((size_x, 0.0, c, 0.0, -size_y, f), _crs_of(items, coordinate_system))


def _crs_of(items: list[str], coordinate_system: str | None) -> str | None:
    """``EPSG:326zz`` / ``327zz`` for UTM on WGS-84, else the header's WKT, else None."""
    projection = items[0].strip().lower()
    if projection == "utm" and len(items) >= 10:
        zone, hemisphere, datum = items[7], items[8].lower(), items[9].lower().replace(" ", "")
        if zone.isdigit() and datum in ("wgs-84", "wgs84") and hemisphere in ("north", "south"):
            return f"EPSG:{(32600 if hemisphere == 'north' else 32700) + int(zone)}"
    if coordinate_system:
        return coordinate_system.strip().strip("{}").strip() or None
    return None


def envi_georef(path: str | Path) -> Georef | None:
    """The georeference in an ENVI image's header, or None when it has no ``map info``."""
    header = find_header(path)
    fields = parse_header(header.read_text(errors="replace"), f"ENVI header '{header}'")
    if "map info" not in fields:
        return None
    return parse_map_info(fields["map info"], fields.get("coordinate system string"), f"ENVI header '{header}'")


def read_georef(path: str | Path) -> Georef | None:
    """The georeference of an ENVI image or a GeoTIFF (None when the file has none)."""
    if is_geotiff(path):
        rasterio = require_rasterio(f"reading the GeoTIFF '{Path(path).name}'")
        with rasterio.open(path) as src:
            if src.crs is None and src.transform.is_identity:
                return None
            t = src.transform
            crs = src.crs.to_string() if src.crs is not None else None
            return Georef((t.a, t.b, t.c, t.d, t.e, t.f), crs)
    return envi_georef(path)


def read_raster(path: str | Path) -> np.ndarray:
    """An image as an array (bands, lines, samples): a GeoTIFF through rasterio, anything else as ENVI."""
    if not is_geotiff(path):
        return read_envi(path)
    path = Path(path)
    if not path.is_file():
        raise EnviError(f"GeoTIFF '{path}' does not exist")
    rasterio = require_rasterio(f"reading the GeoTIFF '{path.name}'")
    with rasterio.open(path) as src:
        return src.read()


def write_geotiff(path: str | Path, array: np.ndarray, georef: Georef, *, nodata: float | None = None) -> Path:
    """Write (b, h, w) or (h, w) ``array`` as a GeoTIFF placed by ``georef`` (deflate-compressed)."""
    rasterio = require_rasterio("writing a GeoTIFF")
    from affine import Affine

    cube = array[None] if array.ndim == 2 else array
    path = Path(path)
    profile = {
        "driver": "GTiff", "height": int(cube.shape[1]), "width": int(cube.shape[2]), "count": int(cube.shape[0]),
        "dtype": str(cube.dtype), "transform": Affine(*georef.transform), "compress": "deflate",
    }
    if georef.crs:
        profile["crs"] = georef.crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(cube)
    return path


def map_info_text(georef: Georef, template: str) -> str:
    """A ``map info`` value for ``georef`` that keeps the projection fields of ``template`` (another map
    info value): reference pixel (1, 1) at the transform's origin. For headers of cropped scenes."""
    a, b, c, d, e, f = georef.transform
    if b or d:
        raise EnviError("map info cannot describe a rotated transform")
    items = _map_info_items(template)
    items[1:7] = ["1.000", "1.000", _number(c), _number(f), _number(a), _number(-e)]
    return "{" + ", ".join(items) + "}"


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)


def copy_georeference(source_header: str | Path, target: str | Path, *, row: int = 0, col: int = 0) -> None:
    """Append the ``map info`` (shifted to the window starting at ``row``, ``col``) and the coordinate system
    string of the ENVI header ``source_header`` to the header of the ENVI image ``target``."""
    fields = parse_header(Path(source_header).read_text(errors="replace"), str(source_header))
    if "map info" not in fields:
        raise EnviError(f"'{source_header}' has no 'map info' to copy")
    georef = parse_map_info(fields["map info"], fields.get("coordinate system string")).crop(row, col)
    header = find_header(target)
    lines = [f"map info = {map_info_text(georef, fields['map info'])}"]
    if "coordinate system string" in fields:
        lines.append(f"coordinate system string = {fields['coordinate system string']}")
    text = header.read_text()
    header.write_text(text + ("" if text.endswith("\n") else "\n") + "\n".join(lines) + "\n")


def same_transform(first: Georef, second: Any, *, tol: float = 1e-6) -> bool:
    """Whether two transforms (Georef or any 6+ coefficient sequence, e.g. an ``affine.Affine``) agree."""
    a = first.transform
    b = tuple(second.transform if isinstance(second, Georef) else tuple(second)[:6])
    return all(abs(x - y) <= tol * max(1.0, abs(x)) for x, y in zip(a, b))


__all__ = [
    "GEOTIFF_SUFFIXES", "Georef", "copy_georeference", "envi_georef", "is_geotiff", "map_info_text", "parse_map_info",
    "read_georef", "read_raster", "require_rasterio", "same_transform", "write_geotiff",
]
