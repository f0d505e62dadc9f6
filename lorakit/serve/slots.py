"""Adapter slots: which adapters a server knows (name -> folder) and which of them are in the model.

At most ``capacity`` adapters are resident; when another is needed, the least recently used one that no running
request needs is evicted, and it is loaded again from its folder when asked for. Folders loaded at runtime must lie
under the adapter root, and so must every file in them, checked at each (re)load.

Not thread-safe: the engine changes slots only from its scheduler thread (other threads may read ``paths``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import InvalidValue
from ..files.io import read_adapter_config
from ..models.model import LoraModel
from .sampling import RequestError, quoted


class AdapterSlots:
    """The adapters of one base model.

    Attributes:
        base: The base model (LoRA layers injected in place once an adapter is resident).
        lora: The ``LoraModel`` around ``base`` while any adapter is resident, else None.
        paths: Every registered adapter, name -> folder.
        retired: Unregistered adapters still resident because running requests use them.
        loads: Adapter loads so far (reloads included).
    """

    def __init__(self, model: torch.nn.Module, capacity: int, root: str | Path | None,
                 before_change: Callable[[], None]) -> None:
        if capacity < 1:
            raise InvalidValue(f"max_adapters must be at least 1, got {capacity}")
        self.base = model
        self.lora = None
        self.capacity = capacity
        self.root = Path(root).resolve() if root is not None else None
        self.paths: dict[str, Path] = {}
        self.retired: set[str] = set()
        self.loads = 0
        self._resident: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU order, oldest first
        self._rooted: set[str] = set()  # loaded at runtime: their files must stay under the root
        self._before_change = before_change  # called before the model's adapters change

    @property
    def resident(self) -> list[str]:
        """The adapters in the model, least recently used first."""
        return list(self._resident)

    def register(self, name: str, folder: Path, rooted: bool = False) -> None:
        """Remember an adapter's folder; ``rooted``: it came through the API, so every (re)load checks that its
        files lie under the root."""
        if name in self.paths:
            raise InvalidValue(f"adapter {name!r} is given twice")
        self.paths[name] = folder
        if rooted:
            self._rooted.add(name)
        else:
            self._rooted.discard(name)

    def add(self, name: str, folder: Path, busy: set[str]) -> None:
        """Register an adapter that came through the API and make it resident; on failure nothing is registered.

        Raises:
            RequestError: 400 for a taken name or an adapter that does not load, 409 for a name whose unloaded
                adapter still serves running requests, 503 when every slot is in ``busy``.
        """
        if name in self.paths:
            raise RequestError(400, f"an adapter named {name!r} is already loaded (from {self.paths[name]})")
        if name in self.retired:
            raise RequestError(409, f"the adapter {name!r} was unloaded and requests still run on it; load it "
                                    f"again once they finish")
        self.register(name, folder, rooted=True)
        try:
            if not self.place(name, busy):
                raise RequestError(503, f"all {self.capacity} adapter slots are in use by running requests; "
                                        f"try again shortly")
        except BaseException:
            del self.paths[name]
            raise

    def unregister(self, name: str, busy: set[str]) -> None:
        """Forget ``name``; it leaves the model at once, or when the last request in ``busy`` using it ends.

        Raises:
            RequestError: 404 when no adapter has that name.
        """
        if name not in self.paths:
            raise RequestError(404, f"no adapter named {name!r}; adapters: {sorted(self.paths)}")
        del self.paths[name]
        if name in self._resident:
            self.retired.add(name)
            self.evict_retired(busy)

    def allowed(self, path: str | Path) -> Path:
        """The folder ``path`` names under the root (relative paths are taken from the root).

        Raises:
            RequestError: 403 without a root, for ``..`` or a folder outside the root (symlinks resolved); 400 for a
                path that is too long or cannot be resolved.
        """
        if self.root is None:
            raise RequestError(403, "loading adapters at runtime is off: start the server with --adapter-root DIR")
        if len(str(path)) > 4096:  # PATH_MAX on Linux
            raise RequestError(400, f"lora_path {quoted(str(path))} is longer than 4096 characters")
        given = Path(path)
        if ".." in given.parts:
            raise RequestError(403, f"lora_path {quoted(str(path))} contains '..'; give a folder under {self.root}")
        try:
            folder = (given if given.is_absolute() else self.root / given).resolve()  # symlinks resolved too
        except (ValueError, OSError, RuntimeError) as err:  # NUL bytes, symlink loops
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err  # strerror: without the path
            raise RequestError(400, f"lora_path {quoted(str(path))} is not a usable path: {reason}") from None
        if not folder.is_relative_to(self.root):
            raise RequestError(403, f"lora_path {quoted(str(path))} is outside the adapter root {str(self.root)!r}")
        return folder

    def place(self, name: str, busy: set[str]) -> bool:
        """Make ``name`` resident, evicting the least recently used adapter not in ``busy`` when all slots are
        taken. False when every slot is busy.

        Raises:
            RequestError: 400 when the adapter does not load (the model stays as it was), 403 when a file of a
                runtime-loaded adapter leads out of the root.
        """
        if name in self._resident:
            self._resident.move_to_end(name)
            return True
        while len(self._resident) >= self.capacity:
            idle = next((n for n in self._resident if n not in busy), None)
            if idle is None:
                return False
            self._evict(idle)
        self._load(name, self.paths[name])
        self._resident[name] = None
        self.loads += 1
        return True

    def evict_retired(self, busy: set[str]) -> None:
        for name in list(self.retired - busy):
            self._evict(name)

    def _load(self, name: str, folder: Path) -> None:
        if name in self._rooted:
            self._check_files_inside_root(name, folder)
        self._before_change()
        try:
            if read_adapter_config(folder).get("use_dora"):
                raise InvalidValue("DoRA adapters cannot share a batch with other adapters; serve it alone with --merge")
            if self.lora is None:
                self.lora = LoraModel.from_pretrained(self.base, folder, name)
            else:
                self.lora.load_adapter(folder, name)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the files, the client gets 400
            where = "" if str(folder) in str(err) else f" at {str(folder)!r}"  # most errors name their file
            raise RequestError(400, f"the adapter {name!r}{where} could not be loaded: {err}") from None

    def _check_files_inside_root(self, name: str, folder: Path) -> None:
        try:
            files = [p.resolve() for p in folder.iterdir()] if folder.is_dir() else []
        except (OSError, RuntimeError) as err:
            raise RequestError(400, f"the adapter {name!r} at {str(folder)!r} cannot be read: {err}") from None
        outside = [str(p) for p in files if not p.is_relative_to(self.root)]
        if outside:
            raise RequestError(403, f"the adapter {name!r} has files that lead outside the adapter root: {outside}")

    def _evict(self, name: str) -> None:
        self._before_change()
        if len(self.lora.peft_config) == 1:  # the last adapter: back to the plain model
            self.base = self.lora.unload()
            self.lora = None
        else:
            self.lora.delete_adapter(name)
        del self._resident[name]
        self.retired.discard(name)
