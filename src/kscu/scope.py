"""Which UNet parameters an erase trains.

Cross-attention (``attn2``) is where the text prompt enters the UNet, so editing only it
(``xattn``) changes how a word is *read* and suits styles and named instances; editing
everything else (``noxattn``) changes how the concept is *drawn* and suits objects and nudity.
On SD v1.4 ``noxattn`` is 815.4M elements and ``xattn`` 44.0M.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kscu.errors import KscuError

_LAYERS = (nn.Linear, nn.Conv2d)

_RULES: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: "attn2" in name,
    "noxattn": lambda name: "attn2" not in name,
    "selfattn": lambda name: "attn1" in name,
}


def trainable_names(unet: nn.Module, scope: str) -> list[str]:
    """Parameter names (weights and biases) that ``scope`` trains, in the UNet's order."""
    if scope == "full":
        return [name for name, _ in unet.named_parameters()]
    if scope not in _RULES:
        raise KscuError(f"unknown scope {scope!r}; choose one of full, {', '.join(_RULES)}")
    rule = _RULES[scope]
    names = [
        f"{module_name}.{param_name}"
        for module_name, module in unet.named_modules()
        if isinstance(module, _LAYERS) and rule(module_name)
        for param_name, _ in module.named_parameters(recurse=False)
    ]
    if not names:
        raise KscuError(f"scope {scope!r} selects no parameters of this UNet; pick another scope")
    return names
