"""Int8 model versions: the parent's safetensors plus a recipe (JSON), quantized when the version loads.

Why a recipe and not quantized weights: torch's int8 modules serialize their packed weights only through pickle
(``torch.save``), which lmbatch never loads. Applying the recipe to the fp32 weights is deterministic, takes a few
seconds (SmolLM2-135M: ~3 s), and the recipe is part of the version's files, so its checksum covers it.

Method ``int8``: ``torch.ao.quantization.quantize_dynamic``, int8 weights per output channel and int8 activations
quantized per tensor at run time (fbgemm / x86 kernels: CPUs only, so a GPU worker refuses such a version). torchao
was measured too (0.18 on torch 2.13): its int8 layers ran at 0.49x fp32 speed on this CPU, with no fast CPU kernel.

The output head (``lm_head``) always stays fp32 (see ``output_head``).

Outliers: a per-tensor activation scale is set by the largest input of the layer. Small language models have a few
layers (SmolLM2-135M: the MLP output projection of 6 of 30 layers) whose inputs peak at hundreds or thousands of
times their typical channel, which leaves every other channel a handful of int8 steps; quantizing them cost 7.5
points of zero-shot accuracy on 40 review sentences. The job measures each linear layer's inputs on calibration
text and keeps those whose peak exceeds ``outlier_ratio`` times the median channel's peak in fp32 (the recipe names
them); with SmolLM2 that kept accuracy and ran ~1.5-3x faster than fp32 on 2 cores.

This module imports torch but neither pydantic nor db: the engines-only benchmarks load it on a bare GPU host.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.errors import PermanentJobError
from workers.models.check_data import check_prompts, check_sentences

RECIPE_FILE = "lmbatch-quantization.json"
RECIPE_FORMAT = 1
METHODS = ("int8",)
# A layer whose calibration inputs peak above this many times the median channel's peak stays in fp32: at 64 a
# typical channel keeps about two int8 steps of the 127 a per-tensor scale gives (see the module docstring).
DEFAULT_OUTLIER_RATIO = 64.0
# Calibration text (calibration_batches): texts of the shipped check set, and the tokens kept of each.
CALIBRATION_PROMPTS = 8
CALIBRATION_SENTENCES = 16
CALIBRATION_TOKENS = 256
# A recipe names module paths (`model.layers.11.mlp.down_proj`), never files or anything else.
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_MAX_RECIPE_BYTES = 1 << 20
_RECIPE_KEYS = frozenset({"format", "method", "keep_fp32", "parent", "outlier_ratio"})
# Engines whose int8 kernels run on this CPU, best first (x86 is fbgemm plus onednn where it is faster).
_CPU_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


class RecipeError(PermanentJobError):
    """A version's quantization recipe is not one lmbatch wrote: unreadable, a link, or holding unknown fields."""

    code = "invalid_quantization_recipe"


class QuantizedOnGpuError(PermanentJobError):
    """An int8 version asked to load on a GPU: torch's dynamic int8 layers have CPU kernels only."""

    code = "quantized_model_on_gpu"


@dataclass(frozen=True)
class Recipe:
    """How a version's fp32 weights become its int8 model. ``parent`` (the ref it was made from) is for people
    reading the file; loading never follows it: the weights are the version's own files."""

    method: str
    keep_fp32: tuple[str, ...]
    parent: str
    outlier_ratio: float | None  # None: every linear layer was quantized

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT,
            "method": self.method,
            "keep_fp32": list(self.keep_fp32),
            "parent": self.parent,
            "outlier_ratio": self.outlier_ratio,
        }

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        """The recipe in ``data``, checked field by field; anything else (a path, an unknown key) is refused."""
        if not isinstance(data, dict):
            raise RecipeError("a quantization recipe is a JSON object")
        unknown = sorted(set(data) - _RECIPE_KEYS)
        if unknown:
            raise RecipeError(f"the quantization recipe has unknown fields {unknown}")
        if data.get("format") != RECIPE_FORMAT:
            raise RecipeError(f"quantization recipe format {data.get('format')!r}; this lmbatch reads {RECIPE_FORMAT}")
        method = data.get("method")
        if method not in METHODS:
            raise RecipeError(f"quantization method {method!r}; known: {', '.join(METHODS)}")
        kept = data.get("keep_fp32", [])
        if not isinstance(kept, list) or not all(isinstance(n, str) and _MODULE_NAME.match(n) for n in kept):
            raise RecipeError("keep_fp32 must list module names such as model.layers.3.mlp.down_proj")
        ratio = data.get("outlier_ratio")
        if ratio is not None and (not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio < 1):
            raise RecipeError("outlier_ratio must be a number of at least 1, or null")
        parent = data.get("parent", "")
        if not isinstance(parent, str) or len(parent) > 300:
            raise RecipeError("parent must be a model ref")
        return cls(str(method), tuple(kept), parent, None if ratio is None else float(ratio))


def read_recipe(directory: Path) -> Recipe | None:
    """The recipe of the model directory, or None for a plain model. The file must be a regular file inside the
    directory: a link (which could point anywhere on the host) is refused, not followed."""
    path = Path(directory) / RECIPE_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:  # ELOOP: the recipe is a symbolic link
        raise RecipeError(f"{RECIPE_FILE} cannot be opened as a regular file of the model directory") from error
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecipeError(f"{RECIPE_FILE} is not a regular file")
        raw = handle.read(_MAX_RECIPE_BYTES + 1)
    if len(raw) > _MAX_RECIPE_BYTES:
        raise RecipeError(f"{RECIPE_FILE} is over {_MAX_RECIPE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise RecipeError(f"{RECIPE_FILE} is not JSON: {error}") from error
    return Recipe.from_json(data)


def write_recipe(directory: Path, recipe: Recipe) -> Path:
    path = Path(directory) / RECIPE_FILE
    path.write_text(json.dumps(recipe.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def use_cpu_engine() -> str:
    """Select the best int8 engine this torch offers on this CPU (before quantizing: modules pack their weights for
    the engine selected then). Raises RecipeError when there is none."""
    supported = torch.backends.quantized.supported_engines
    for engine in _CPU_ENGINES:
        if engine in supported:
            if torch.backends.quantized.engine != engine:
                torch.backends.quantized.engine = engine
            return engine
    raise RecipeError(f"this torch build has no int8 CPU engine (supported: {supported})")


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]


def apply_recipe(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """Quantize ``model`` (fp32, on the CPU) in place as ``recipe`` says and return it."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linears = linear_names(model)
    missing = sorted(set(recipe.keep_fp32) - set(linears))
    if missing:
        raise RecipeError(f"the recipe keeps layers this model does not have: {missing[:5]}")
    use_cpu_engine()
    kept = set(recipe.keep_fp32)
    spec: dict[Any, Any] = {name: per_channel_dynamic_qconfig for name in linears if name not in kept}
    quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(module, DynamicLinear) for module in model.modules())


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes a model holds: parameters and buffers, plus the packed int8 weights (and their fp32 biases) of its
    quantized layers, which are neither."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


@dataclass(frozen=True)
class InputRange:
    """The largest input a linear layer saw on calibration text, and the median over its channels of each
    channel's largest: their ratio is how far one outlier stretches a per-tensor int8 scale."""

    peak: float
    typical: float

    @property
    def ratio(self) -> float:
        return self.peak / max(self.typical, 1e-12)


def input_ranges(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, InputRange]:
    """Run ``batches`` (keyword arguments of the model's forward, unpadded or with an attention mask) through
    ``model`` and record every linear layer's input range. Padded positions are left out where a mask says so."""
    peaks: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Any:
        def record(_module: torch.nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).abs()
            keep = mask[0]
            if keep is not None and keep.numel() == flat.shape[0]:
                flat = flat[keep.reshape(-1).bool()]
            if flat.shape[0] == 0:
                return
            channel = flat.amax(dim=0).float()
            peaks[name] = torch.maximum(peaks[name], channel) if name in peaks else channel

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear
    ]
    try:
        with torch.inference_mode():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: InputRange(float(p.max()), float(p.median())) for name, p in peaks.items()}


def outlier_layers(ranges: dict[str, InputRange], outlier_ratio: float | None) -> list[str]:
    """The layers whose inputs stretch past ``outlier_ratio`` (None: none)."""
    if outlier_ratio is None:
        return []
    return sorted(name for name, seen in ranges.items() if seen.ratio > outlier_ratio)


def output_head(model: torch.nn.Module) -> list[str]:
    """The name of a language model's output head (``lm_head``), which stays fp32 in every recipe lmbatch writes:
    tied to the input embedding, in fp32 it costs no memory of its own, where int8 adds a copy; it is the layer
    greedy text is most sensitive to (quantized alone, it cost SmolLM2-135M 12% of its next-token agreement); and
    the compact decoder computes it in column chunks from its fp32 weight (int8 there fell back to the static
    decoder: 1.1x fp32 speed, against 1.8x with the head in fp32). Empty for a model without one (an encoder)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not torch.nn.Linear:
        return []
    return [name for name, module in model.named_modules() if module is head][:1]


def layers_kept(model: torch.nn.Module, ranges: dict[str, InputRange], outlier_ratio: float | None) -> list[str]:
    """What a recipe keeps in fp32: the output head, and the layers with activation outliers."""
    return sorted({*output_head(model), *outlier_layers(ranges, outlier_ratio)})


def calibration_batches(tokenizer: Any, *, task: str, max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Calibration input from the shipped check set, one unpadded batch per text: for a causal LM some chat
    prompts, rendered as the generate engine renders them, and for every model some review sentences. Enough for
    each layer's outliers to show (they sit in fixed channels, on every text), few enough to take seconds; long
    prompts are cut to ``max_tokens``, since range statistics do not need whole contexts."""
    texts = [text for text, _ in check_sentences(CALIBRATION_SENTENCES)]
    special = True
    if task == "causal-lm" and getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
            for item in check_prompts(CALIBRATION_PROMPTS)
        ]
        # A rendered chat prompt carries its own special tokens, as the generate engine feeds it.
        texts, special = prompts + texts, False
    return [
        {"input_ids": torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"][:max_tokens]])}
        for text in texts
    ]
