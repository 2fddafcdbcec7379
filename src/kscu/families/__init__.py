"""Model families: which one a model or pipeline belongs to.

A family is found from ``model_index.json``'s ``_class_name`` (or a loaded pipeline's class), or
named by the user (``--family``). Adding a family means adding its module and one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kscu.errors import KscuError
from kscu.families.flux import FluxFamily
from kscu.families.sd import SDFamily
from kscu.families.sdxl import SDXLFamily
from kscu.fileio import read_json_object

FAMILIES: dict[str, Any] = {"sd": SDFamily(), "sdxl": SDXLFamily(), "flux": FluxFamily()}


def get_family(name: str) -> Any:
    if not isinstance(name, str) or name not in FAMILIES:
        raise KscuError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_class(class_name: str, where: str = "the model") -> Any:
    """The family whose pipeline class is ``class_name``; an unsupported one is an error."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise KscuError(
        f"{where} is a {class_name}, which kscu does not support; supported: {supported} "
        "(or name one with --family)"
    )


def family_of(pipe: Any, named: str | None = None) -> Any:
    """The family of a loaded pipeline: ``named`` if given (``EraseConfig.family``, for a class
    kscu does not know), its recorded family if kscu loaded it, else that of the first class in
    its ancestry kscu knows (a user's subclass of StableDiffusionPipeline holds the same
    networks)."""
    if named:
        return get_family(named)
    name = getattr(pipe, "_kscu_family", None)
    if name is not None:
        return get_family(name)
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipeline_classes:
                return family
    return family_for_class(type(pipe).__name__, "the pipeline")


def detect_family(model_folder: Path | None, class_name: str | None = None) -> Any:
    """From a local folder's ``model_index.json`` (or a class name read from the hub)."""
    if class_name is None and model_folder is not None:
        index = model_folder / "model_index.json"
        fix = "give a diffusers pipeline folder"
        class_name = read_json_object(index, fix).get("_class_name")
    if not class_name:
        return FAMILIES["sd"]
    return family_for_class(class_name, str(model_folder or "the model"))
