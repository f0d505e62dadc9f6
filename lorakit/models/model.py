"""LoraModel: many named adapters on one frozen base model.

``get_lora_model(model, config)`` wraps the targeted modules in place and returns a ``LoraModel`` that
forwards to the model (``forward``, ``generate``, and any attribute it lacks). Adapters are added, loaded,
activated, stacked, disabled, merged, combined and deleted by name, as in PEFT.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.combine import add_weighted_adapter
from ..core.config import BASE_ROW, LoraConfig, check_adapter_name
from ..core.errors import InvalidType, InvalidValue
from ..core.inject import ModulesToSave, inject, set_submodule
from ..core.layers import LoraLayer, is_4bit
from ..core.mixed import check_rows, copies_per_row, expand_for_generation, routing_for
from ..core.quant import MergeReport, default_probe, keep_autograd_path, logits, merge_4bit
from ..core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from ..files.export import export_merged
from ..files.io import check_fits, copy_in, read_adapter, save_adapters
from ..files.model_card import write_model_card

logger = logging.getLogger(__name__)


class LoraModel(nn.Module):
    """A model with LoRA adapters. Use :func:`get_lora_model` to build one.

    Attributes:
        model: The wrapped model (its targeted modules replaced by LoRA layers).
        peft_config: Each adapter's :class:`LoraConfig`, by name.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
                 init_weights: bool = True) -> None:
        super().__init__()
        self.model = model
        self._wrappers: tuple[list, list] | None = None
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = []
        self._inference_only: set[str] = set()
        for p in model.parameters():
            p.requires_grad_(False)
        if any(is_4bit(m) for m in model.modules()):
            keep_autograd_path(model)
        self.add_adapter(adapter_name, config, init_weights=init_weights)
        self.set_adapter(adapter_name)

    # -- forwarding to the model -------------------------------------------------------------------------

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the model. With ``adapter_names``, row i of the batch uses adapter ``adapter_names[i]``
        (``"__base__"`` for none), in one batched pass."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        check_rows(adapter_names, args, kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's ``generate``, optionally with one adapter per row (``adapter_names``).

        With beam search (``num_beams``) or several sequences per row (``num_return_sequences``) each name is
        repeated for its row's copies (PEFT repeats them for ``num_beams`` given to the call only; lorakit also for
        ``num_return_sequences`` and for either read from the generation config); an encoder-decoder's encoder
        sees each row once.
        """
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        check_rows(adapter_names, args, kwargs)
        expanded = expand_for_generation(adapter_names, copies_per_row(self.model, kwargs))
        encoder = adapter_names if self._is_encoder_decoder else None
        with self.mixed_batch(expanded, encoder_adapter_names=encoder):
            return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not built yet: avoid recursing forever
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, LoRA layers included (see ``unload`` for the plain one)."""
        return self.model

    # -- layers ------------------------------------------------------------------------------------------

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """Every LoRA layer of the model with its module name."""
        return iter(self._structure()[0])

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """Every module trained in full (``modules_to_save``, a classification head) with its module name."""
        return iter(self._structure()[1])

    def _structure(self) -> tuple[list[tuple[str, LoraLayer]], list[tuple[str, ModulesToSave]]]:
        # Walking ~1000 modules costs milliseconds; the wrappers only change in add_adapter and unload.
        if self._wrappers is None:
            named = list(self.model.named_modules())
            self._wrappers = ([(n, m) for n, m in named if isinstance(m, LoraLayer)],
                              [(n, m) for n, m in named if isinstance(m, ModulesToSave)])
        return self._wrappers

    # -- adapters ----------------------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters; several are stacked (their updates add up)."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's attribute)."""
        return self._active[0]

    def add_adapter(self, adapter_name: str, config: LoraConfig, *, init_weights: bool = True) -> list[str]:
        """Add a new, trainable adapter; it becomes active only through ``set_adapter``. ``init_weights=False``
        leaves it zero and the base untouched, for trained values copied in next (what loading does).

        Returns:
            The names of the modules that received it.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise InvalidValue(f"adapter {adapter_name!r} already exists; adapters: {sorted(self.peft_config)}")
        if not isinstance(config, LoraConfig):
            raise InvalidType(f"config must be a LoraConfig, got {type(config).__name__}")
        wrapped = inject(self.model, config, adapter_name, init_weights=init_weights)
        self._wrappers = None
        self.peft_config[adapter_name] = config
        self._refresh()
        return wrapped

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several (a list: their updates add up). Only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise InvalidValue("set_adapter needs at least one adapter name")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise InvalidValue(f"unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)}")
        self._active = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer. The last adapter cannot be deleted (use ``unload``)."""
        if adapter_name not in self.peft_config:
            raise InvalidValue(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise InvalidValue(f"{adapter_name!r} is the only adapter; use unload() to get the base model back")
        for _, layer in self.lora_layers():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for _, module in self.saved_modules():
            if adapter_name in module.modules_to_save:
                module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._inference_only.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name] or [next(iter(self.peft_config))]
        self._refresh()

    def _refresh(self) -> None:
        """Push the active list to every layer and set ``requires_grad`` to match it."""
        trainable = [n for n in self._active if n not in self._inference_only]
        for _, layer in self.lora_layers():
            layer.set_active(self._active)
            for name, adapter in layer.adapters.items():
                adapter.requires_grad_(name in trainable)
        for _, module in self.saved_modules():
            module.set_active(self._active)
            for name, head in module.modules_to_save.items():
                head.requires_grad_(name in trainable)
        biases = {self.peft_config[n].bias for n in trainable}
        wrapped_biases = {id(layer.base.bias) for _, layer in self.lora_layers()
                          if getattr(layer.base, "bias", None) is not None}
        for name, param in self.model.named_parameters():
            if not name.endswith("bias") or any(f".{part}." in name for part in _LORAKIT_PARTS):
                continue
            param.requires_grad_("all" in biases or ("lora_only" in biases and id(param) in wrapped_biases))

    @contextmanager
    def unmerged(self) -> Iterator[None]:
        """Within the block the base weights hold no update: merged adapters are taken out, then put back."""
        merged = {name: list(layer.merged_adapters) for name, layer in self.lora_layers() if layer.merged_adapters}
        self.unmerge_adapter()
        try:
            yield
        finally:
            for name, layer in self.lora_layers():
                layer.merge(merged.get(name, []))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model (merged adapters are unmerged)."""
        modules = [m for _, m in self.lora_layers()] + [m for _, m in self.saved_modules()]
        before = [m.disabled for m in modules]  # restored on exit, so nested blocks work
        with self.unmerged():
            for module in modules:
                module.disabled = True
            try:
                yield
            finally:
                for module, state in zip(modules, before):
                    module.disabled = state

    def disable_adapter_layers(self) -> None:
        """Turn every adapter layer and trained head off until :meth:`enable_adapter_layers`: the model computes
        the base model (merged adapters are unmerged first) and no adapter trains. As PEFT's; for a block of code,
        ``with disable_adapter():`` is the safer form."""
        biased = [n for n in self._active if self.peft_config[n].bias != "none"]
        if biased:  # PEFT's warning: the trained base biases stay in the model
            logger.warning("adapters %s train base biases (bias != 'none'); with the adapter layers disabled the "
                           "model is still not the original base model", biased)
        self.unmerge_adapter()
        for _, module in [*self.lora_layers(), *self.saved_modules()]:
            module.disabled = True
        self.set_requires_grad(list(self.peft_config), False)

    def enable_adapter_layers(self) -> None:
        """Turn the adapter layers on again after :meth:`disable_adapter_layers`; the active adapters train again."""
        for _, module in [*self.lora_layers(), *self.saved_modules()]:
            module.disabled = False
        self._refresh()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Let the parameters of ``adapter_names`` (A, B, DoRA magnitudes, trained heads) train, or stop them, as
        PEFT's method does. ``set_adapter`` and ``enable_adapter_layers`` set them again from the active list."""
        if not isinstance(requires_grad, bool):
            raise InvalidType(f"requires_grad must be True or False, got {requires_grad!r}")
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        elif not (isinstance(adapter_names, Sequence) and all(isinstance(n, str) for n in adapter_names)):
            raise InvalidType(f"adapter_names must be an adapter name or a list of them, got {adapter_names!r}")
        names = self._known(adapter_names)
        for _, module in self.lora_layers():
            for name in names:
                if name in module.adapters:
                    module.adapters[name].requires_grad_(requires_grad)
        for _, module in self.saved_modules():
            for name in names:
                if name in module.modules_to_save:
                    module.modules_to_save[name].requires_grad_(requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One :class:`~lorakit.core.status.TunerLayerStatus` per LoRA layer and trained head (PEFT's method)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The :class:`~lorakit.core.status.TunerModelStatus` of the whole model (PEFT's method)."""
        return get_model_status(self)

    @contextmanager
    def mixed_batch(self, adapter_names: Sequence[str], *,
                    encoder_adapter_names: Sequence[str] | None = None) -> Iterator[None]:
        """Within the block row i of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

        Setting the routing stacks each layer's adapters once, so a server that keeps the same rows for many
        decoding steps enters this block once for all of them. ``encoder_adapter_names`` routes an
        encoder-decoder's encoder, which beam search runs before it repeats the rows: one name per input row, so
        that repeating each k times gives ``adapter_names``.

        Raises:
            ValueError: Unknown names, DoRA adapters, merged adapters, or ``encoder_adapter_names`` on a model that
                is not an encoder-decoder or that do not repeat into ``adapter_names``.
        """
        names = list(dict.fromkeys(n for n in adapter_names if n != BASE_ROW))
        unknown = [n for n in dict.fromkeys([*adapter_names, *(encoder_adapter_names or [])])
                   if n != BASE_ROW and n not in self.peft_config]
        if unknown:
            raise InvalidValue(f"adapter_names has unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)} "
                               f"or {BASE_ROW!r} for the base model")
        if encoder_adapter_names is not None:
            if not self._is_encoder_decoder:
                raise InvalidValue("encoder_adapter_names routes an encoder-decoder's encoder; this model has no "
                                   "encoder (config.is_encoder_decoder is not set)")
            rows = len(encoder_adapter_names)
            copies = len(adapter_names) // rows if rows else 0
            if not copies or expand_for_generation(encoder_adapter_names, copies) != list(adapter_names):
                raise InvalidValue(f"encoder_adapter_names ({rows} entries) must be adapter_names "
                                   f"({len(adapter_names)} entries) with each row once: repeating each name k times "
                                   f"must give adapter_names")
        dora = [n for n in names if self.peft_config[n].use_dora]
        if dora:
            raise InvalidValue(f"mixed batches (adapter_names=..., with or without num_beams) do not support DoRA "
                               f"adapters; {dora} use DoRA")
        if any(layer.merged_adapters for _, layer in self.lora_layers()):
            raise InvalidValue("mixed batches need unmerged adapters; call unmerge_adapter() first")
        slots = {n: i for i, n in enumerate(names, start=1)}

        def index_of(rows: Sequence[str]) -> torch.Tensor:
            return torch.tensor([slots.get(n, 0) for n in rows], dtype=torch.long, device=self.device)

        index = index_of(adapter_names)
        encoder: set[int] = set()
        if encoder_adapter_names is not None:
            encoder = {id(m) for m in self.model.get_encoder().modules()}
        encoder_index = index_of(encoder_adapter_names) if encoder else index
        layers = [layer for _, layer in self.lora_layers()]
        heads = [module for _, module in self.saved_modules()]
        try:
            for layer in layers:
                layer.routing = routing_for(layer, encoder_index if id(layer) in encoder else index, names)
            for head in heads:
                head.routing = (encoder_index if id(head) in encoder else index, names)
            yield
        finally:
            for module in layers + heads:
                module.routing = None

    @property
    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    @property
    def device(self) -> torch.device:
        """The device of the model's (first) parameters."""
        return next(self.model.parameters()).device

    # -- counting ----------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as PEFT counts them (4-bit weights count twice)."""
        trainable = total = 0
        for param in self.model.parameters():
            n = param.numel()
            if type(param).__name__ == "Params4bit":
                n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- merging -----------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, in fp32; undo with ``unmerge_adapter``.

        Refused (ValueError) while the adapter layers are disabled: ``disable_adapter_layers`` promises the base model.
        """
        names = self._known(self._active if adapter_names is None else adapter_names)
        self._check_enabled(names)
        if any(is_4bit(layer.base) and set(names) & set(layer.adapters) for _, layer in self.lora_layers()):
            raise InvalidValue("merging into a 4-bit base weight would round it to 4 bits again (lossy, and unmerge "
                               "could not undo it); use merge_and_unload(), which returns dense layers, or "
                               "merge_and_unload(requantize=True)")
        for _, layer in self.lora_layers():
            layer.merge(names)

    def _known(self, names: Sequence[str]) -> list[str]:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise InvalidValue(f"unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)}")
        return list(names)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, *, requantize: bool = False,
                         dtype: torch.dtype | None = None, probe: Any = None) -> nn.Module:
        """Fold the adapters (default: the active ones) into the weights and return the plain model.

        On a 4-bit base (QLoRA) the 4-bit layers are dequantized and become dense ``nn.Linear`` layers in
        ``dtype`` (default: their compute dtype), or, with ``requantize=True``, the merged ones are quantized
        again (see :func:`lorakit.core.quant.merge_4bit`). The logits before and after are then compared on ``probe``
        (input ids or a dict of model inputs; default: two rows of fixed token ids for Hugging Face models) and the
        :class:`~lorakit.core.quant.MergeReport` is logged and kept as ``lorakit_merge_report`` on the returned model.
        ``dtype``, ``requantize`` and ``probe`` concern 4-bit bases only (``requantize`` without one is an error).
        """
        names = self._known(self._active if adapter_names is None else adapter_names)
        self._check_enabled(names)
        if not any(is_4bit(m) for m in self.model.modules()):
            if requantize:
                raise InvalidValue("requantize=True re-quantizes 4-bit layers; this model has none")
            self.merge_adapter(names)
            return self._unwrap(names)
        probe = default_probe(self.model, self.device) if probe is None else probe
        before = logits(self, probe) if probe is not None else None
        merge_4bit(self.model, list(self.lora_layers()), names, requantize=requantize, dtype=dtype)
        plain = self._unwrap(names)
        if before is not None:
            report = MergeReport.of(before, logits(plain, probe), requantize)
            plain.lorakit_merge_report = report
            logger.info("%s", report)
        return plain

    def _check_enabled(self, names: Sequence[str]) -> None:
        """Merging is refused while the adapter layers are disabled: a disabled layer computes the base alone, and a
        merged update would bring the adapter back."""
        if any(layer.disabled and set(names) & set(layer.adapters) for _, layer in self.lora_layers()):
            raise InvalidValue(f"cannot merge adapter(s) {names} while the adapter layers are disabled (a disabled "
                               f"layer computes the base model alone); call enable_adapter_layers() first")

    def unload(self) -> nn.Module:
        """Return the plain base model, without any adapter's update (merged ones are unmerged first)."""
        self.unmerge_adapter()
        return self._unwrap([])

    def _unwrap(self, heads_of: Sequence[str]) -> nn.Module:
        """Put every base module back; a trained head replaces the original if an adapter in ``heads_of`` has one."""
        for name, layer in list(self.lora_layers()):
            set_submodule(self.model, name, layer.base)
        for name, module in list(self.saved_modules()):
            head = next((module.modules_to_save[n] for n in heads_of if n in module.modules_to_save),
                        module.original_module)
            set_submodule(self.model, name, head)
        self._wrappers = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    # -- files (see lorakit.files.io) --------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None,
                        base_model_name_or_path: str | None = None,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, *,
                        selected_adapters: Sequence[str] | None = None, safe_serialization: bool = True,
                        is_main_process: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``): ``default``
        in ``save_directory``, any other name in ``save_directory/<name>``; then a model card, ``README.md``, in
        ``save_directory``, as PEFT writes one (a ``README.md`` of the user's keeps its text; see
        :mod:`lorakit.files.model_card`).

        ``path_initial_model_for_weight_conversion``: the folder of a PiSSA (or OLoRA, CorDA) adapter saved right
        after its initialization; the trained adapter is then written as an ordinary LoRA adapter of twice the
        rank for the *original* base (PEFT's conversion, see :func:`lorakit.files.io.save_adapters`).

        The keyword arguments PEFT's ``save_pretrained`` takes and Hugging Face's Trainer passes are accepted:
        ``selected_adapters`` (PEFT's name for ``adapter_names``), ``is_main_process`` (False: write nothing, as on
        the other ranks of a distributed run). ``safe_serialization=False`` (pickle) and a ``state_dict`` gathered
        by DeepSpeed or FSDP are refused: lorakit writes safetensors from the model's own adapter tensors."""
        if not safe_serialization:
            raise InvalidValue("safe_serialization=False asks for a pickle file; lorakit writes only "
                               "adapter_model.safetensors")
        if state_dict is not None:
            raise InvalidValue("save_pretrained(state_dict=...) is not supported: lorakit saves the adapters from the "
                               "model's own tensors (a state_dict is passed by DeepSpeed / FSDP saving, which lorakit's "
                               "Trainer integration does not support)")
        if selected_adapters is not None:
            if adapter_names is not None:
                raise InvalidValue("pass adapter_names or selected_adapters (PEFT's name for it), not both")
            adapter_names = selected_adapters
        if not is_main_process:
            return
        save_adapters(self, save_directory, adapter_names, base_model_name_or_path,
                      path_initial_model_for_weight_conversion)
        try:  # the card is documentation: the adapter files are saved whole either way
            write_model_card(save_directory, names=list(self.peft_config) if adapter_names is None else adapter_names)
        except OSError as err:
            warnings.warn(f"the adapters are saved in {save_directory}, but its model card README.md could not be "
                          f"written ({err})", stacklevel=2)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     allow_pickle: bool = False, force: bool = False, allow_symlinks: bool = False) -> None:
        """Load an adapter saved by lorakit or PEFT under ``adapter_name``. On any error the model is unchanged.

        Args:
            is_trainable: Whether the loaded adapter trains when active (False: inference only, as in PEFT).
            allow_pickle: Accept a pickle ``adapter_model.bin`` (read with ``weights_only=True``).
            force: Load even if the fingerprint says the base differs (the shapes must still fit).
            allow_symlinks: Follow symbolic links in the folder that lead out of it (refused by default).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise InvalidValue(f"adapter {adapter_name!r} already exists; adapters: {sorted(self.peft_config)}")
        config, tensors, metadata = read_adapter(path, allow_pickle, allow_symlinks)
        with self.unmerged():  # the fingerprint describes the base weights without any update folded in
            targets = check_fits(self.model, config, tensors, metadata, force)
        try:
            self.add_adapter(adapter_name, config, init_weights=False)
            copy_in(self, adapter_name, targets, tensors)
        except BaseException:
            if adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._inference_only.add(adapter_name)
        self._refresh()

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False, force: bool = False,
                        allow_symlinks: bool = False) -> LoraModel:
        """Wrap a plain ``model`` with the adapter saved at ``path`` (by lorakit or PEFT). On any error the model
        is unchanged. The arguments are :meth:`load_adapter`'s."""
        check_adapter_name(adapter_name)
        config, tensors, metadata = read_adapter(path, allow_pickle, allow_symlinks)
        targets = check_fits(model, config, tensors, metadata, force)
        lora = cls(model, config, adapter_name, init_weights=False)
        copy_in(lora, adapter_name, targets, tensors)
        if not is_trainable:
            lora._inference_only.add(adapter_name)
        lora._refresh()
        return lora

    def export_merged(self, save_directory: str | os.PathLike, tokenizer: Any = None,
                      adapter_names: Sequence[str] | None = None, *, format: str = "hf",
                      quant: str | None = None) -> Path:
        """Save the model with the adapters folded in, as a Hugging Face folder (``format="hf"``) or one GGUF file
        (``format="gguf"``, ``quant`` f16, q8_0 or f32); this model stays as it is. See
        :func:`lorakit.files.export.export_merged`."""
        return export_merged(self, save_directory, tokenizer, adapter_names, format=format, quant=quant)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Combine adapters into a new one, as PEFT does: ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``,
        ``dare_ties``, ``magnitude_prune`` and the ``_svd`` variants of the last four (see
        :func:`lorakit.core.combine.add_weighted_adapter` for the arguments)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                             majority_sign_method)


_LORAKIT_PARTS = ("adapters", "modules_to_save", "original_module")


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap the modules ``config`` targets with LoRA and return the model with adapter ``adapter_name`` active.

    The base model's parameters are frozen; the adapter's A and B (plus ``modules_to_save`` copies and the
    biases ``config.bias`` asks for) are trainable.

    Raises:
        ValueError: A target matches nothing (with the closest real module names) or is not a supported layer.
    """
    return LoraModel(model, config, adapter_name)
