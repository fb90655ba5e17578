"""Architectural attention techniques (levels 1-4), one file each; importing this package registers them.

Each module holds a technique's config dataclass (registered in `attnlab.techniques`), the blocks or
kernels it adds, and the hooks a backbone asks for. Modules are found, not listed, so adding a
technique is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
