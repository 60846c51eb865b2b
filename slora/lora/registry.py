"""Names -> validated adapter specs: what may be requested, checked cheaply when registered.

Registration reads an adapter's config and safetensors header only (`read_adapter`), so that
thousands of adapters register quickly and a bad one is refused before any request can name it.
"""

from __future__ import annotations

from pathlib import Path

from slora.architecture import ArchitectureSpec
from slora.lora.adapter import CONFIG_FILE, AdapterError, AdapterSpec, read_adapter


class UnknownAdapterError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class AdapterRegistry:
    def __init__(self, arch: ArchitectureSpec, max_rank: int):
        self.arch = arch
        self.max_rank = max_rank
        self._specs: dict[str, AdapterSpec] = {}

    def add(self, name: str, path: str | Path) -> AdapterSpec:
        if not name or name in self._specs:
            raise AdapterError(path, f"adapter name {name!r} is empty or already registered")
        spec = read_adapter(name, path, self.arch, self.max_rank)
        self._specs[name] = spec
        return spec

    def add_folder(self, folder: str | Path) -> list[AdapterSpec]:
        """Register every sub-folder holding an adapter_config.json, named after the sub-folder."""
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise AdapterError(root, "adapter directory not found")
        return [self.add(sub.name, sub) for sub in sorted(root.iterdir()) if (sub / CONFIG_FILE).is_file()]

    def remove(self, name: str) -> AdapterSpec:
        return self._specs.pop(self.get(name).name)

    def get(self, name: str) -> AdapterSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter {name!r} is not registered") from None

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)
