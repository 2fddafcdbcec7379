"""Which UNet parameters an erase trains.

Cross-attention (``attn2``) is where the text prompt enters the UNet, so editing only it
(``xattn``) changes how a word is *read* and suits styles and named instances; editing
everything else (``noxattn``) changes how the concept is *drawn* and suits objects and nudity.
On SD v1.4 ``noxattn`` is 815.4M elements and ``xattn`` 44.0M.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kscu.errors import KscuError


def trainable_names(net: nn.Module, scope: str, family: Any = None) -> list[str]:
    """Parameter names (weights and biases) that ``scope`` trains, in the network's order.

    The family names its scopes (``family.scope_rules``: module name -> bool) and the layer kinds
    they select (``family.scope_layers``); ``full`` is every parameter.
    """
    if family is None:
        from kscu.families import FAMILIES

        family = FAMILIES["sd"]
    if scope == "full":
        return [name for name, _ in net.named_parameters()]
    rules = family.scope_rules
    if scope not in rules:
        raise KscuError(
            f"unknown scope {scope!r} for {family.name}; choose one of full, {', '.join(rules)}"
        )
    rule = rules[scope]
    names = [
        f"{module_name}.{param_name}"
        for module_name, module in net.named_modules()
        if isinstance(module, family.scope_layers) and rule(module_name)
        for param_name, _ in module.named_parameters(recurse=False)
    ]
    if not names:
        raise KscuError(f"scope {scope!r} selects no parameters of this model; pick another scope")
    return names
