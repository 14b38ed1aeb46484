"""Image-folder trees, or a ``.tar(.gz)`` of one: which images they hold and where each
belongs (``.../train/<class>/<file>``), and the classes of a user's own data set, found
without decoding an image."""

import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from kdlight.errors import KDLightError, one_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "test")
LAYOUT = "train/<class>/*.png|jpg and test/<class>/*.png|jpg"


def iter_images(path: Path, what: str, read: bool = True) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, file bytes) of every image in a folder tree or a .tar(.gz) of one;
    the bytes are ``b""`` unless ``read``. ``what`` names the tree in errors."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                name = PurePosixPath(file.relative_to(path).as_posix())
                yield name, file.read_bytes() if read else b""
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = PurePosixPath(member.name)
                if member.isfile() and name.suffix.lower() in IMAGE_SUFFIXES:
                    yield name, archive.extractfile(member).read() if read else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise KDLightError(
            f"cannot read {what} {path}: {one_line(err)} (is it a complete .tar.gz?)"
        ) from None


def locate(name: PurePosixPath) -> tuple[str, str] | None:
    """('train'|'test', class) for ``.../train/<class>/<file>``, else None."""
    parts = name.parts
    if len(parts) >= 3 and parts[-3] in SPLITS:
        return parts[-3], parts[-2]
    return None


def listed(names: list[str] | tuple[str, ...], limit: int = 10) -> str:
    """``names`` joined by commas, the first ``limit`` of them when there are more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def image_folder_classes(root: str | Path | None) -> tuple[str, ...]:
    """The classes of the user's data set at ``root``: the folders under ``train/`` that hold
    images, sorted. Every class folder of ``test/`` must be one of them.

    ``root`` is a folder, or a .tar(.gz) of one, laid out as ``train/<class>/*.png|jpg`` and
    ``test/<class>/*.png|jpg`` (under any top-level folder). Only the names are read (a
    .tar.gz is read through once); the images are decoded and checked when loaded.
    """
    if not root:
        raise KDLightError(
            f"data=image_folder needs data.root=PATH: a folder (or a .tar.gz of one) of {LAYOUT}"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise KDLightError(f"image folder not found: {path} (data.root=PATH)")
    found: dict[str, set[str]] = {split: set() for split in SPLITS}
    for name, _ in iter_images(path, "image folder", read=False):
        if (located := locate(name)) is not None:
            found[located[0]].add(located[1])
    for split in SPLITS:
        if not found[split]:
            raise KDLightError(
                f"image folder {path} has no images under '{split}/<class>/'; expected {LAYOUT}"
            )
    classes = tuple(sorted(found["train"]))
    if unknown := sorted(found["test"] - found["train"]):
        raise KDLightError(
            f"image folder {path}: class folder(s) under 'test/' that 'train/' lacks: "
            f"{listed(unknown)} (train/ has {listed(classes)})"
        )
    if len(classes) < 2:
        raise KDLightError(
            f"image folder {path} has one class folder under 'train/' ({classes[0]}): a "
            "classifier needs two or more"
        )
    return classes
