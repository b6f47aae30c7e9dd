"""PASCAL VOC annotations: the XML format (VOC 2007-2012) and the older text format
"PASCAL Annotation Version 1.00" (VOC 2005, INRIA, TU Darmstadt, ...), parsed into one record.

    record = parse_annotation("Annotations/000001.xml")          # either format, sniffed
    boxes, classes, difficult = record.arrays(VOC_CLASSES)       # [n, 4] xyxy, [n], [n]

The version 1.00 text format, line by line (lines starting with `#` are comments, except that
`# Top left pixel co-ordinates : (x, y)` states the coordinate origin, kept in `origin`):

    # PASCAL Annotation Version 1.00
    Image filename : "INRIA/Train/pos/crop_000010.png"
    Image size (X x Y x C) : 594 x 720 x 3
    Database : "The INRIA Rennes Database"
    Objects with ground truth : 1 { "PASperson" }
    # Top left pixel co-ordinates : (0, 0)
    # Details for object 1 ("PASperson")
    Original label for object 1 "PASperson" : "UprightPerson"
    Center point on object 1 "PASperson" (X, Y) : (341, 217)
    Bounding box for object 1 "PASperson" (Xmin, Ymin) - (Xmax, Ymax) : (261, 109) - (511, 705)
    Pixel mask for object 1 "PASperson" : "INRIA/masks/crop_000010-01.png"

Coordinates are kept exactly as written (VOC XML and most v1.00 files count pixels from 1,
inclusive); `cnn.metrics.detection` treats them as continuous coordinates. A malformed file raises
`ValueError("<path>:<line>: <what is wrong>")`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence
from typing import Any
from xml.parsers import expat
from xml.sax.saxutils import escape

import numpy as np

V1_HEADER = "# PASCAL Annotation Version 1.00"
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


@dataclasses.dataclass(frozen=True)
class AnnotatedObject:
    """One annotated object.

    Attributes:
      name: the class label (`"dog"` in XML, `"PASperson"` in v1.00 files).
      box: `(x_min, y_min, x_max, y_max)` as written in the file.
      difficult: VOC's "difficult" flag (ignored by the VOC evaluation); False in v1.00 files.
      truncated, occluded: VOC XML flags (False when absent).
      pose: VOC XML pose ("Unspecified" when absent).
      original_label: v1.00 "Original label" (e.g. "UprightPerson"), else None.
      center: v1.00 "Center point" `(x, y)`, else None.
      mask: v1.00 "Pixel mask" file name, else None.
    """

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    truncated: bool = False
    occluded: bool = False
    pose: str = "Unspecified"
    original_label: str | None = None
    center: tuple[float, float] | None = None
    mask: str | None = None


@dataclasses.dataclass(frozen=True)
class Annotation:
    """The annotation of one image, whichever file format it came from.

    Attributes:
      filename: the image file named by the annotation.
      width, height, depth: the image size (`X x Y x C` in v1.00 files).
      database: the source database ("The VOC2007 Database", "The INRIA Rennes Database").
      objects: the annotated objects, in file order.
      source_format: "voc_xml" or "pascal_v1".
      path: the annotation file that was parsed ("" when parsed from a string).
      folder: VOC XML `<folder>` ("" when absent).
      segmented: VOC XML `<segmented>` flag.
      origin: v1.00 "Top left pixel co-ordinates" `(x, y)`, else None.
    """

    filename: str
    width: int
    height: int
    depth: int
    database: str
    objects: tuple[AnnotatedObject, ...]
    source_format: str
    path: str = ""
    folder: str = ""
    segmented: bool = False
    origin: tuple[int, int] | None = None

    def arrays(self, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(boxes [n, 4] float32 xyxy, classes [n] int32, difficult [n] bool)`.

        Args:
          class_names: maps names to class indices; None gives each name its index in the sorted
            set of names in this annotation (handy only for a single file).

        Raises:
          ValueError: an object's name is not in `class_names`.
        """
        names = sorted({o.name for o in self.objects}) if class_names is None else list(class_names)
        index = {name: i for i, name in enumerate(names)}
        for obj in self.objects:
            if obj.name not in index:
                raise ValueError(
                    f"{self.path or 'annotation'}: object name {obj.name!r} is not in class_names={names}"
                )
        boxes = np.asarray([o.box for o in self.objects], np.float32).reshape(-1, 4)
        classes = np.asarray([index[o.name] for o in self.objects], np.int32)
        difficult = np.asarray([o.difficult for o in self.objects], bool)
        return boxes, classes, difficult


# ---------------------------------------------------------------------------------------------
# VOC XML


@dataclasses.dataclass
class _Element:
    tag: str
    line: int
    children: list[_Element] = dataclasses.field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> _Element | None:
        return next((child for child in self.children if child.tag == tag), None)

    def findall(self, tag: str) -> list[_Element]:
        return [child for child in self.children if child.tag == tag]


def _parse_xml_tree(text: str, where: str) -> _Element:
    """An element tree whose elements remember their line (ElementTree's C parser does not)."""
    parser = expat.ParserCreate()
    root = _Element("", 0)
    stack = [root]

    def start(tag: str, _attributes: dict[str, str]) -> None:
        element = _Element(tag, parser.CurrentLineNumber)
        stack[-1].children.append(element)
        stack.append(element)

    def end(_tag: str) -> None:
        stack.pop()

    def characters(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = characters
    try:
        parser.Parse(text, True)
    except expat.ExpatError as error:
        raise ValueError(f"{where}:{error.lineno}: malformed XML: {expat.errors.messages[error.code]}") from None
    if not root.children:
        raise ValueError(f"{where}:1: no XML element found")
    return root.children[0]


def _child(element: _Element, tag: str, where: str, *, required: bool = True) -> _Element | None:
    child = element.find(tag)
    if child is None and required:
        raise ValueError(f"{where}:{element.line}: <{element.tag}> has no <{tag}> element")
    return child


def _child_text(element: _Element, tag: str, where: str, default: str | None = None) -> str:
    child = _child(element, tag, where, required=default is None)
    return default if child is None else child.text.strip()


def _number(text: str, where: str, line: int, what: str, kind: type = float) -> Any:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}:{line}: {what} must be a number, got {text!r}") from None
    if kind is int:
        if value != int(value):
            raise ValueError(f"{where}:{line}: {what} must be an integer, got {text!r}")
        return int(value)
    return value


def _flag(element: _Element, tag: str, where: str) -> bool:
    child = element.find(tag)
    if child is None or not child.text.strip():
        return False
    text = child.text.strip()
    if text not in ("0", "1"):
        raise ValueError(f"{where}:{child.line}: <{tag}> must be 0 or 1, got {text!r}")
    return text == "1"


def parse_voc_xml_string(text: str, path: str = "") -> Annotation:
    """Parses the text of a VOC XML annotation (see `parse_voc_xml`)."""
    where = path or "<string>"
    root = _parse_xml_tree(text, where)
    if root.tag != "annotation":
        raise ValueError(f"{where}:{root.line}: root element is <{root.tag}>, expected <annotation>")
    size = _child(root, "size", where)
    dims = [
        _number(_child_text(size, tag, where), where, _child(size, tag, where).line, f"<{tag}>", int)
        for tag in ("width", "height")
    ]
    depth_element = size.find("depth")
    depth = 3
    if depth_element is not None:
        depth = _number(depth_element.text.strip(), where, depth_element.line, "<depth>", int)
    source = root.find("source")
    database = "" if source is None else _child_text(source, "database", where, default="")
    objects = []
    for element in root.findall("object"):
        bndbox = _child(element, "bndbox", where)
        box = tuple(
            _number(_child_text(bndbox, tag, where), where, _child(bndbox, tag, where).line, f"<{tag}>")
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}:{bndbox.line}: <bndbox> has xmax < xmin or ymax < ymin: {box}")
        objects.append(
            AnnotatedObject(
                name=_child_text(element, "name", where),
                box=box,
                difficult=_flag(element, "difficult", where),
                truncated=_flag(element, "truncated", where),
                occluded=_flag(element, "occluded", where),
                pose=_child_text(element, "pose", where, default="Unspecified") or "Unspecified",
            )
        )
    return Annotation(
        filename=_child_text(root, "filename", where),
        width=dims[0],
        height=dims[1],
        depth=depth,
        database=database,
        objects=tuple(objects),
        source_format="voc_xml",
        path=path,
        folder=_child_text(root, "folder", where, default=""),
        segmented=_flag(root, "segmented", where),
    )


def parse_voc_xml(path: str | pathlib.Path) -> Annotation:
    """Parses a VOC 2007-2012 XML annotation file.

    Required: `<annotation>` with `<filename>`, `<size>` (`<width>`, `<height>`; `<depth>` defaults
    to 3) and, per `<object>`, `<name>` and `<bndbox>` (`<xmin> <ymin> <xmax> <ymax>`).
    Optional: `<folder>`, `<source><database>`, `<segmented>`, and per object `<pose>`,
    `<truncated>`, `<occluded>`, `<difficult>` (0/1).

    Raises:
      FileNotFoundError: no such file.
      ValueError: malformed XML or a missing/invalid field, as `"<path>:<line>: <reason>"`.
    """
    path = pathlib.Path(path)
    return parse_voc_xml_string(_read(path), str(path))


def to_voc_xml(annotation: Annotation) -> str:
    """The VOC XML text of an annotation (v1.00-only fields are not representable and are dropped)."""

    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    lines = [
        "<annotation>",
        f"\t<folder>{escape(annotation.folder)}</folder>",
        f"\t<filename>{escape(annotation.filename)}</filename>",
        f"\t<source><database>{escape(annotation.database)}</database></source>",
        f"\t<size><width>{annotation.width}</width><height>{annotation.height}</height>"
        f"<depth>{annotation.depth}</depth></size>",
        f"\t<segmented>{int(annotation.segmented)}</segmented>",
    ]
    for obj in annotation.objects:
        corners = "".join(f"<{tag}>{number(v)}</{tag}>" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), obj.box))
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(obj.name)}</name>",
            f"\t\t<pose>{escape(obj.pose)}</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<occluded>{int(obj.occluded)}</occluded>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            f"\t\t<bndbox>{corners}</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# PASCAL Annotation Version 1.00

_QUOTED = r'"([^"]*)"'
_INT = r"(-?\d+(?:\.\d+)?)"
_PAIR = rf"\(\s*{_INT}\s*,\s*{_INT}\s*\)"
_OBJECT_LINE = re.compile(rf"^(?P<key>[A-Za-z][A-Za-z ]*?) (?:for|on) object (?P<index>\d+) {_QUOTED}(?P<rest>.*)$")
_ORIGIN = re.compile(rf"^#\s*Top left pixel co-ordinates\s*:\s*{_PAIR}\s*$")
_SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)\s*x\s*(\d+)$")
_OBJECT_LIST = re.compile(r"^(\d+)\s*\{(.*)\}$")
_BOX = re.compile(rf"^{_PAIR}\s*-\s*{_PAIR}$")


def _unquote(value: str, where: str, line: int, what: str) -> str:
    match = re.fullmatch(_QUOTED, value)
    if match is None:
        raise ValueError(f'{where}:{line}: {what} must be a quoted string "...", got {value!r}')
    return match.group(1)


def parse_pascal_v1_string(text: str, path: str = "") -> Annotation:
    """Parses the text of a "PASCAL Annotation Version 1.00" file (see `parse_pascal_v1`)."""
    where = path or "<string>"
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first].strip() != V1_HEADER:
        line_number = 1 if first is None else first + 1
        raise ValueError(f"{where}:{line_number}: expected the header {V1_HEADER!r}")
    header: dict[str, tuple[str, int]] = {}
    origin = None
    declared: list[str] = []
    declared_line = 0
    fields: dict[int, dict[str, Any]] = {}  # object index -> {"label", "box", "center", ...}

    for number, raw in enumerate(lines[first + 1 :], start=first + 2):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = _ORIGIN.match(line)
            if match:
                origin = (int(float(match.group(1))), int(float(match.group(2))))
            continue
        if " : " not in line:
            raise ValueError(f'{where}:{number}: expected "<field> : <value>", got {line!r}')
        key, value = (part.strip() for part in line.split(" : ", 1))
        object_match = _OBJECT_LINE.match(key)
        if object_match is None:
            if key in header:
                raise ValueError(f"{where}:{number}: field {key!r} given twice (first on line {header[key][1]})")
            header[key] = (value, number)
            if key == "Objects with ground truth":
                match = _OBJECT_LIST.match(value)
                if match is None:
                    raise ValueError(f'{where}:{number}: expected "<count> {{ "label" ... }}", got {value!r}')
                declared = re.findall(_QUOTED, match.group(2))
                declared_line = number
                if len(declared) != int(match.group(1)):
                    raise ValueError(
                        f"{where}:{number}: the object count {match.group(1)} does not match the "
                        f"{len(declared)} labels listed"
                    )
            continue
        index, label = int(object_match.group("index")), object_match.group(3)
        kind = object_match.group("key")
        if not declared_line:
            raise ValueError(f'{where}:{number}: object {index} appears before "Objects with ground truth"')
        if not 1 <= index <= len(declared):
            raise ValueError(f"{where}:{number}: object {index} is out of range (the file declares {len(declared)})")
        if label != declared[index - 1]:
            raise ValueError(
                f"{where}:{number}: object {index} is labelled {label!r} here but {declared[index - 1]!r} in "
                f'"Objects with ground truth"'
            )
        entry = fields.setdefault(index, {"label": label})
        if kind == "Bounding box":
            match = _BOX.match(value)
            if match is None:
                raise ValueError(
                    f"{where}:{number}: expected a bounding box (xmin, ymin) - (xmax, ymax), got {value!r}"
                )
            box = tuple(float(v) for v in match.groups())
            if box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"{where}:{number}: bounding box has Xmax < Xmin or Ymax < Ymin: {box}")
            entry["box"] = (box, number)
        elif kind == "Center point":
            match = re.fullmatch(_PAIR, value)
            if match is None:
                raise ValueError(f"{where}:{number}: expected a centre point (x, y), got {value!r}")
            entry["center"] = tuple(float(v) for v in match.groups())
        elif kind == "Original label":
            entry["original_label"] = _unquote(value, where, number, "the original label")
        elif kind == "Pixel mask":
            entry["mask"] = _unquote(value, where, number, "the pixel mask")
        # Other per-object fields of the format's extensions are accepted and ignored.

    def required(key: str) -> tuple[str, int]:
        if key not in header:
            raise ValueError(f"{where}:{len(lines)}: missing the field {key!r}")
        return header[key]

    filename, line = required("Image filename")
    filename = _unquote(filename, where, line, "the image filename")
    size, line = required("Image size (X x Y x C)")
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"{where}:{line}: expected an image size X x Y x C, got {size!r}")
    width, height, depth = (int(v) for v in match.groups())
    database = ""
    if "Database" in header:
        database = _unquote(header["Database"][0], where, header["Database"][1], "the database")
    required("Objects with ground truth")
    objects = []
    for index, label in enumerate(declared, start=1):
        entry = fields.get(index, {})
        if "box" not in entry:
            raise ValueError(f"{where}:{declared_line}: object {index} ({label!r}) has no bounding box")
        objects.append(
            AnnotatedObject(
                name=label,
                box=entry["box"][0],
                original_label=entry.get("original_label"),
                center=entry.get("center"),
                mask=entry.get("mask"),
            )
        )
    return Annotation(
        filename=filename,
        width=width,
        height=height,
        depth=depth,
        database=database,
        objects=tuple(objects),
        source_format="pascal_v1",
        path=path,
        origin=origin,
    )


def parse_pascal_v1(path: str | pathlib.Path) -> Annotation:
    """Parses a "PASCAL Annotation Version 1.00" text file (format in the module docstring).

    Required: the header line, `Image filename`, `Image size (X x Y x C)`, `Objects with ground
    truth : n { "label" ... }` and a `Bounding box for object i "label"` line per declared object.
    Optional: `Database`, `Original label`, `Center point`, `Pixel mask`, the origin comment.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed or inconsistent file, as `"<path>:<line>: <reason>"`.
    """
    path = pathlib.Path(path)
    return parse_pascal_v1_string(_read(path), str(path))


def _read(path: pathlib.Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file path={str(path)!r} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def parse_annotation(path: str | pathlib.Path) -> Annotation:
    """Parses either format, chosen by content: XML when the file starts with `<`, version 1.00
    when it starts with its header line.

    Raises:
      FileNotFoundError: no such file.
      ValueError: neither format, or a malformed file (`"<path>:<line>: <reason>"`).
    """
    path = pathlib.Path(path)
    text = _read(path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("<"):
        return parse_voc_xml_string(text, str(path))
    if stripped.startswith("# PASCAL Annotation Version"):
        return parse_pascal_v1_string(text, str(path))
    line = text[: len(text) - len(stripped)].count("\n") + 1
    raise ValueError(
        f"{path}:{line}: neither VOC XML (starting with '<') nor {V1_HEADER!r}"
    )


__all__ = [
    "AnnotatedObject",
    "Annotation",
    "V1_HEADER",
    "VOC_CLASSES",
    "parse_annotation",
    "parse_pascal_v1",
    "parse_pascal_v1_string",
    "parse_voc_xml",
    "parse_voc_xml_string",
    "to_voc_xml",
]
