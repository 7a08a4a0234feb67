"""Let plain transformers load a memfit folder: `AutoModelForCausalLM.from_pretrained(folder)`.

A memfit folder's config.json carries
`quantization_config = {"quant_method": "memfit", "format": "memfit/1", "modules": {...}}`.
`register_with_transformers()` (idempotent; `memfit/__init__.py` calls it) registers a
`MemfitConfig` and a `MemfitHfQuantizer` under that quant_method with transformers' public
`register_quantization_config` / `register_quantizer`. During `from_pretrained`, transformers builds
the model on the meta device and calls the quantizer's `_process_model_before_weight_loading`,
which swaps in the described modules (the same builders as `memfit.io.save.load`, on meta);
transformers then fills their packed buffers from model.safetensors as they are stored.

Trade-off: this path relies on transformers' quantizer interface (written against 5.24, which
changes between releases); `memfit.io.save.load` is the path memfit itself uses and controls.
Saving such a model back with `save_pretrained` is refused (`is_serializable` is False): write
with `memfit.io.save.save`, which also writes memfit.json.
"""

from __future__ import annotations

import re

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from memfit.errors import UserError
from memfit.io.save import FORMAT, QUANT_METHOD, _get_tensor, replace_modules, retie


class MemfitConfig(QuantizationConfigMixin):
    """The `quantization_config` of a memfit folder: its format version and module table."""

    def __init__(self, modules: dict | None = None, format: str = FORMAT,
                 tied: dict | None = None, guards: list | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.modules = dict(modules or {})
        self.tied = dict(tied or {})  # packed tensors saved once for several keys
        self.guards = list(guards or [])  # empty `.weight` keys that stop memfit-less loading


class MemfitHfQuantizer(HfQuantizer):
    """Swaps memfit's packed modules into a meta-device model before transformers loads weights."""

    requires_calibration = True  # only pre-compressed folders: memfit compresses, this loads

    def validate_environment(self, *args, **kwargs):
        got = self.quantization_config.format
        if got != FORMAT:
            raise UserError(f"this folder was written in format {got!r}, memfit reads {FORMAT}; "
                            "upgrade memfit or re-save the model")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from memfit.eval.memory import steady_malloc
        steady_malloc()  # repeatable peaks, as memfit's own loader has (CPU or not: harmless)
        modules = self.quantization_config.modules
        from memfit.moe import unfuse_experts_
        unfuse_experts_(model)  # memfit stores one linear per expert (memfit.moe)
        replace_modules(model, modules)
        # the empty `<module>.weight` guards that stop memfit-less loading (memfit.io.save)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {re.escape(g) for g in self.quantization_config.guards}
        # transformers runs `_init_weights` on every module not flagged as initialised, and some
        # reach into a child's weight (GPT-2: `mlp.c_proj.weight`), which a packed module lacks.
        # Every tensor here comes from the checkpoint (checked after loading), so flag the
        # swapped modules and their parents as initialised; except a parent that owns
        # non-persistent buffers, which only its `_init_weights` computes (BertEmbeddings'
        # position_ids over a packed word embedding) and which would stay uninitialised.
        for name in modules:
            model.get_submodule(name)._is_hf_initialized = True
            parent = model.get_submodule(name.rpartition(".")[0])
            if not parent._non_persistent_buffers_set:
                parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # packed tensors shared by several modules (a quantized tied embedding and head) are
        # stored once; point the other keys at them before checking
        retie(model, self.quantization_config.tied)
        for target in self.quantization_config.tied:
            _get_tensor(model, target)._is_hf_initialized = True
        # transformers only warns about missing tensors and leaves them uninitialised; a packed
        # module with garbage codes must not load silently.
        for name in self.quantization_config.modules:
            for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
                if not getattr(t, "_is_hf_initialized", False):
                    raise UserError(f"the checkpoint lacks {name}.{key}; the folder is damaged: "
                                    "re-save the model")
        return model

    def is_serializable(self):
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Register quant_method "memfit" with transformers; calling it again does nothing."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MemfitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MemfitHfQuantizer)
