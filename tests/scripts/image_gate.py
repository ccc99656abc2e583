"""Import esm2_batch and scripts/device_check.py as the lent GPU machine would.

Run as a script (in a fresh interpreter, so nothing is imported yet), it puts an import
hook first on sys.meta_path that refuses any top-level package outside the standard
library, this repository, the GPU image's package list (scripts/device_image_packages.txt)
and the carried wheels (scripts/device_wheels.txt), then imports every module of
esm2_batch, device_check and every module device_check's sections import. It prints one
JSON line: the modules that failed to import (with why) and the refusals (also those a
library caught and went on without, which is what it would do on the image too).

What the image's own packages import is theirs to bring (the image is self-consistent, and
our venv's versions of them differ); what our code and the carried wheels import is
checked. `--without_wheels` refuses the wheels too: the control that shows the gate bites.

    python tests/scripts/image_gate.py [--without_wheels]
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import pkgutil
import re
import sys
from collections.abc import Sequence
from importlib.metadata import packages_distributions
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
IMAGE_LIST = SCRIPTS / "device_image_packages.txt"
WHEELS_LIST = SCRIPTS / "device_wheels.txt"
ALIASES = {  # distributions whose import name is not their own, when not installed here
    "pillow": {"PIL"}, "scikit-learn": {"sklearn"}, "scikit-image": {"skimage"},
    "opencv-python-headless": {"cv2"}, "pyyaml": {"yaml"}, "protobuf": {"google"},
    "python-dateutil": {"dateutil"}, "attrs": {"attr", "attrs"}, "grpcio": {"grpc"},
    "nvidia-ml-py": {"pynvml"}, "py-cpuinfo": {"cpuinfo"}, "cupy-cuda13x": {"cupy"},
    "markdown-it-py": {"markdown_it"}, "pytorch-lightning": {"pytorch_lightning"},
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> list[str]:
    """Distribution names of a package list or requirements file (comments skipped)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(canonical(re.split(r"[\s=<>!~;\[]", line, maxsplit=1)[0]))
    return out


def pins(path: Path = WHEELS_LIST) -> dict[str, str]:
    """name -> pinned version of the carried wheels."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            out[canonical(name)] = pinned.strip()
    return out


def import_names(distributions: Sequence[str]) -> set[str]:
    """Top-level import names of `distributions`: from this venv's metadata where one is
    installed here, else the name itself (and ALIASES)."""
    by_dist: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(canonical(dist), set()).add(module)
    names: set[str] = set()
    for dist in distributions:
        names |= by_dist.get(dist, set()) | ALIASES.get(dist, set())
        names.add(dist.replace("-", "_"))
    return names


def local_names() -> set[str]:
    """This repository's importable top-level names (the package, tests, the scripts)."""
    found = {"esm2_batch", "tests", "scripts"}
    found |= {p.stem for p in SCRIPTS.glob("*.py")}
    return found


class ImageGate(importlib.abc.MetaPathFinder):
    """Refuses a top-level import outside `allowed` unless an image package asks."""

    def __init__(self, allowed: set[str], image: set[str]) -> None:
        self.allowed = allowed
        self.image = set(image)
        self.refused: list[dict[str, str]] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top in self.allowed:
            return None
        importer = _importer()
        if importer in self.image or importer == top:  # the image's packages bring
            self.image.add(top)  # their own needs, and those their own parts
            return None
        self.refused.append({"module": fullname, "imported_by": importer})
        raise ModuleNotFoundError(f"No module named {fullname!r} (not in the GPU image, "
                                  "not carried)", name=fullname)


def _importer() -> str:
    """Top-level name of the module whose code is importing (past importlib's frames)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        ours = frame.f_code.co_filename == __file__ and frame.f_code.co_name != "main"
        if not name.startswith(("importlib", "_frozen_importlib")) and not ours:
            return name.partition(".")[0]
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def modules_to_import() -> list[str]:
    """Every module of esm2_batch, device_check, and what device_check's sections import."""
    import esm2_batch

    names = ["esm2_batch"] + [m.name for m in pkgutil.walk_packages(
        esm2_batch.__path__, prefix="esm2_batch.") if not m.name.endswith("__main__")]
    names.append("device_check")
    return names


def main(argv: list[str]) -> int:
    sys.path[:0] = [str(ROOT), str(SCRIPTS)]
    image = import_names(listed(IMAGE_LIST))
    wheels = set() if "--without_wheels" in argv else import_names(listed(WHEELS_LIST))
    allowed = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | local_names()
    allowed |= image | wheels | {"__main__"}
    gate = ImageGate(allowed, image)
    sys.meta_path.insert(0, gate)
    failed: dict[str, str] = {}
    names = modules_to_import() if "--without_wheels" not in argv else [
        "esm2_batch.models", "esm2_batch.sources.ensembl_rest", "device_check"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    if "device_check" in sys.modules:
        for name in sys.modules["device_check"].MODULES:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"failed": failed, "refused": gate.refused,
                      "imported": sorted({m.partition(".")[0] for m in sys.modules})}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
