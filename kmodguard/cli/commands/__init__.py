"""The commands behind the parser, one module a family; each command returns an exit code.

The parser names a command (`func`); only its family's module is imported, and the engine
(config, devices, diagnosis, libkmod, the environment probe) only by the commands that judge or
plan: `index build` starts depmod as early as it can, and the engine was 7 ms of its start.
"""

from __future__ import annotations

import importlib

FAMILY = {
    "status": "status", "explain": "status",
    "fix": "fix",
    "check": "check",
    "daemon": "system", "config_check": "system", "footprint": "system",
    "index_build": "index", "index_list": "index", "index_show": "index", "index_fetch": "index",
    "index_derive": "index", "index_remove": "index",
}


def command(name: str):
    """The function behind the parser's command `name`, its family's module imported now. (Not a
    module attribute: importing the family module `status` binds `commands.status` to the module,
    and the command of the same name would be lost.)"""
    return getattr(importlib.import_module(f"{__name__}.{FAMILY[name]}"), name)
