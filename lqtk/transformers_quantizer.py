"""lqtk exports in plain transformers: after `import lqtk`, `AutoModelForCausalLM.from_pretrained(export_dir)` loads an
lqtk export (quant_method "lqtk", `lqtk.model_format`) with its `QuantizedLinear`s, through transformers' quantizer
registry, so users need no lqtk-specific loader.

An export's config.json has model_type "lqtk" (the model's own in "lqtk_base_model_type"), which transformers does
not know: without lqtk it refuses the folder ("model type `lqtk` but Transformers does not recognize this
architecture") rather than skip the unknown quant_method and load the model with random weights in place of the
quantized Linears. Importing this module registers model_type "lqtk" with `AutoConfig`, whose config class gives the
base model's config (`LlamaConfig`, ...) with the export's quantization_config, so `AutoConfig`,
`AutoModelForCausalLM` and `AutoTokenizer` read the folder as they read the base model's.

Before the weights load, the quantizer puts a `QuantizedLinear` on the meta device in place of every Linear that the
export's `quantization_config["layers"]` lists, with the names, shapes and dtypes of the tensors the export stores
for it (read from the safetensors headers); transformers then loads those tensors by name as it loads any other."""

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lqtk.errors import LqtkError
from lqtk.model_format import BASE_MODEL_TYPE, FORMAT_VERSION, MODEL_TYPE, base_config_dict, install_quantized_layers
from lqtk.weights import WeightFiles


class LqtkExportConfig(PretrainedConfig):
    """model_type "lqtk" for `AutoConfig`: `from_dict` (and so `from_pretrained`) of an export's config.json gives
    its base model's config class, built from the rest of it."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        base = config_dict.get(BASE_MODEL_TYPE)
        if not isinstance(base, str) or base == MODEL_TYPE or base not in CONFIG_MAPPING:
            raise ValueError(f"an lqtk export's config.json names {BASE_MODEL_TYPE} {base!r}, which this transformers "
                             "does not know: the export is corrupt, or needs a newer transformers")
        return CONFIG_MAPPING[base].from_dict(base_config_dict(config_dict), **kwargs)


AutoConfig.register(MODEL_TYPE, LqtkExportConfig)


@register_quantization_config("lqtk")
class LqtkConfig(QuantizationConfigMixin):
    """An lqtk export's `quantization_config`: the format version, each quantized Linear's `layer_config()`, and
    the token pruning it runs with (if any)."""

    def __init__(self, format_version: int, layers: dict, token_pruning: dict | None = None, **kwargs):
        self.quant_method = "lqtk"
        self.format_version, self.layers, self.token_pruning = format_version, layers, token_pruning

    def to_dict(self) -> dict:
        config = {"quant_method": "lqtk", "format_version": self.format_version, "layers": self.layers}
        return config | ({"token_pruning": self.token_pruning} if self.token_pruning else {})


@register_quantizer("lqtk")
class LqtkHfQuantizer(HfQuantizer):
    """Loads lqtk exports (pre-quantized only: quantizing goes through `lqtk fit`)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.format_version != FORMAT_VERSION:
            raise LqtkError(f"the model is lqtk format version {self.quantization_config.format_version}; this lqtk "
                            f"reads version {FORMAT_VERSION}: install the lqtk that wrote it")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise LqtkError("an lqtk export loads from its folder of safetensors files")
        files = WeightFiles(Path(checkpoint_files[0]).parent)
        install_quantized_layers(model, files, self.quantization_config.layers, self.quantization_config.token_pruning)

    def is_serializable(self):
        return False  # `lqtk export` / ExportQuantized write this format; save_pretrained would not record it

    @property
    def is_trainable(self) -> bool:
        return False
