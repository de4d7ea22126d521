"""Int8 versions without a worker: the recipe (strict, a regular file of the model directory, never a link out of
it), quantizing at load (CPU only: a GPU is refused before any weight is read), calibration finding activation
outliers, staging by hard links, the shipped check set, and the check's refusal rule."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from workers.engines.generate import generate
from workers.engines.params import GenerateParams
from workers.engines.types import EngineItem
from workers.errors import PermanentJobError
from workers.models.check_data import check_prompts, check_sentences
from workers.models.loading import LoadedModel, load_model
from workers.models.quality import CheckSize, quality_check, refusal
from workers.models.quantize import (
    RECIPE_FILE,
    QuantizedOnGpuError,
    Recipe,
    RecipeError,
    apply_recipe,
    calibration_batches,
    input_ranges,
    is_quantized,
    layers_kept,
    linear_names,
    outlier_layers,
    output_head,
    read_recipe,
    write_recipe,
)
from workers.models.store import MARKER
from workers.shards.quantize_runner import stage_files

CPU = torch.device("cpu")
OUTLIER_LAYER = 1
OUTLIER_CHANNEL = 5
OUTLIER_SCALE = 10_000.0


def int8_copy(tmp_path: Path, source: Path, recipe: Recipe) -> Path:
    target = tmp_path / "int8"
    shutil.copytree(source, target)
    write_recipe(target, recipe)
    return target


def with_outlier(model: LoadedModel) -> LoadedModel:
    """The tiny Llama with one activation outlier, its fp32 function unchanged: channel 5 of layer 1's attention
    norm scaled up 10,000x and the same input columns of q/k/v scaled down as much (the norm feeds only them)."""
    changed = copy.copy(model)
    changed.model = copy.deepcopy(model.model)
    layer = changed.model.model.layers[OUTLIER_LAYER]
    with torch.no_grad():
        layer.input_layernorm.weight[OUTLIER_CHANNEL] *= OUTLIER_SCALE
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.weight[:, OUTLIER_CHANNEL] /= OUTLIER_SCALE
    return changed


def calibration(model: LoadedModel) -> list[dict[str, torch.Tensor]]:
    return calibration_batches(model.tokenizer, task="causal-lm", max_tokens=model.context_window())


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits


def attention_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the outlier layer's attention block adds to the residual stream."""
    seen: list[torch.Tensor] = []
    attention = model.model.layers[OUTLIER_LAYER].self_attn
    handle = attention.register_forward_hook(lambda _m, _a, output: seen.append(output[0]))
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------------------------------ the recipe


def test_a_recipe_round_trips_and_anything_it_does_not_define_is_refused(tmp_path: Path) -> None:
    recipe = Recipe("int8", ("model.layers.0.mlp.down_proj",), "tiny@1", 64.0)
    write_recipe(tmp_path, recipe)
    assert read_recipe(tmp_path) == recipe
    good = recipe.to_json()
    # A field naming a path (or anything unknown), a module name that is a path, an unknown method: refused.
    for bad in (
        {**good, "weights": "/etc/passwd"},
        {**good, "keep_fp32": ["../../etc"]},
        {**good, "method": "int4"},
        {**good, "format": 2},
        {**good, "outlier_ratio": 0.5},
    ):
        (tmp_path / RECIPE_FILE).write_text(json.dumps(bad))
        with pytest.raises(RecipeError):
            read_recipe(tmp_path)
    assert read_recipe(tmp_path / "nowhere") is None  # a plain model has none


def test_a_recipe_that_is_a_link_out_of_the_model_directory_is_refused(tmp_path: Path, tiny_dirs: dict) -> None:
    # Given an int8 copy whose recipe was swapped for a symbolic link to a file outside the model store
    target = int8_copy(tmp_path, tiny_dirs["causal-lm"], Recipe("int8", (), "tiny@1", None))
    outside = tmp_path / "elsewhere.json"
    outside.write_text((target / RECIPE_FILE).read_text())
    (target / RECIPE_FILE).unlink()
    os.symlink(outside, target / RECIPE_FILE)
    # When it is loaded, I expect a permanent error, the link never followed.
    with pytest.raises(RecipeError, match="regular file"):
        load_model(target, task="causal-lm", device=CPU)


# ---------------------------------------------------------------------------------------------- quantized at load


def test_a_version_with_a_recipe_is_quantized_as_it_loads_and_still_generates(
    tmp_path: Path, tiny_dirs: dict, tiny_lm: LoadedModel
) -> None:
    kept = "model.layers.0.mlp.down_proj"
    target = int8_copy(tmp_path, tiny_dirs["causal-lm"], Recipe("int8", (kept,), "tiny@1", 64.0))
    loaded = load_model(target, task="causal-lm", device=CPU)
    assert loaded.quantization == "int8" and is_quantized(loaded.model)
    modules = dict(loaded.model.named_modules())
    assert type(modules[kept]) is torch.nn.Linear  # the recipe's fp32 layer
    assert linear_names(loaded.model) == [kept]  # every other linear layer is int8 now
    # The int8 weights count in what the cache budgets, though they are neither parameters nor buffers.
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert loaded.nbytes > params
    items = [EngineItem(index=0, custom_id=None, input={"prompt": "Hello"})]
    [result] = generate(loaded, items, GenerateParams(max_new_tokens=4), batch_size=1)
    assert result.error is None and result.completion_tokens == 4


def test_a_gpu_worker_refuses_an_int8_version_before_reading_its_weights(tmp_path: Path, tiny_dirs: dict) -> None:
    target = int8_copy(tmp_path, tiny_dirs["causal-lm"], Recipe("int8", (), "acme/tiny@1", None))
    (target / "model.safetensors").unlink()  # nothing to load: the refusal must come first
    with pytest.raises(QuantizedOnGpuError, match=r"CPU kernels only.*CPU worker") as refused:
        load_model(target, task="causal-lm", device=torch.device("cuda"))
    # The message goes to whoever runs the job: it never names the parent, which may be another tenant's model
    assert isinstance(refused.value, PermanentJobError) and "acme/tiny" not in str(refused.value)


def test_only_a_language_models_output_head_is_named_as_one(tiny_lm: LoadedModel, tiny_encoder: LoadedModel) -> None:
    assert output_head(tiny_lm.model) == ["lm_head"]
    assert output_head(tiny_encoder.model) == []


def test_a_recipe_keeping_a_layer_the_model_lacks_is_refused(tiny_lm: LoadedModel) -> None:
    with pytest.raises(RecipeError, match="does not have"):
        apply_recipe(copy.deepcopy(tiny_lm.model), Recipe("int8", ("model.layers.9.mlp.up_proj",), "x", 64.0))


# ----------------------------------------------------------------------------------------------------- calibration


def test_calibration_finds_an_activation_outlier_and_keeping_its_layers_in_fp32_saves_their_output(
    tiny_lm: LoadedModel,
) -> None:
    # Given the tiny Llama with one injected activation outlier, its fp32 output unchanged
    model = with_outlier(tiny_lm)
    batch = calibration(model)[0]
    assert torch.allclose(logits(model.model, batch), logits(tiny_lm.model, batch), atol=1e-3)
    # When its layers' inputs are measured on calibration text
    kept = outlier_layers(input_ranges(model.model, calibration(model)), 64.0)
    # I expect exactly the three layers the outlier feeds found, kept in fp32 with the output head
    prefix = f"model.layers.{OUTLIER_LAYER}.self_attn"
    assert kept == [f"{prefix}.k_proj", f"{prefix}.q_proj", f"{prefix}.v_proj"]
    ranges = input_ranges(model.model, calibration(model))
    assert layers_kept(model.model, ranges, 64.0) == ["lm_head", *kept]
    assert layers_kept(model.model, {}, None) == ["lm_head"]  # no ratio: only the head
    # and quantizing them anyway to wreck that attention block's output, which fp32 layers keep close.
    reference = attention_output(model.model, batch)
    errors = {}
    for name, keep in (("all", ()), ("kept", tuple(kept))):
        int8 = apply_recipe(copy.deepcopy(model.model), Recipe("int8", keep, "x", None))
        errors[name] = float((attention_output(int8, batch) - reference).norm() / reference.norm())
    assert errors["all"] > 0.5 and errors["kept"] < 0.1, errors


# -------------------------------------------------------------------------------------------------------- staging


def test_staging_hard_links_the_parent_files_and_leaves_out_the_builtin_marker(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    (parent / "sub").mkdir(parents=True)
    (parent / "model.safetensors").write_bytes(b"weights")
    (parent / "sub" / "tokenizer.json").write_text("{}")
    (parent / MARKER).write_text("{}")
    staged = stage_files(parent, tmp_path / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        "model.safetensors",
        "sub/tokenizer.json",
    ]
    # The same bytes on disk, yet the new version's own: removing the parent leaves them in place.
    assert (staged / "model.safetensors").stat().st_ino == (parent / "model.safetensors").stat().st_ino
    shutil.rmtree(parent)
    assert (staged / "model.safetensors").read_bytes() == b"weights"


def test_staging_refuses_a_link_in_the_parent(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    os.symlink("/etc/hostname", parent / "config.json")
    with pytest.raises(PermanentJobError, match="symbolic link"):
        stage_files(parent, tmp_path / "staged")


# ---------------------------------------------------------------------------------------- the check and its data


def test_the_shipped_check_set_is_64_distinct_prompts_and_200_balanced_sentences() -> None:
    prompts = check_prompts()
    assert len(prompts) == 64 and len({json.dumps(p) for p in prompts}) == 64
    sentences = check_sentences()
    assert len(sentences) == 200 and len({text for text, _ in sentences}) == 200
    # Labels alternate, so the first N of any size are balanced.
    assert [label for _, label in sentences[:4]] == ["positive", "negative", "positive", "negative"]
    assert sum(label == "positive" for _, label in sentences) == 100


def test_the_check_compares_int8_with_its_parent(tmp_path: Path, tiny_dirs: dict, tiny_lm: LoadedModel) -> None:
    target = int8_copy(tmp_path, tiny_dirs["causal-lm"], Recipe("int8", (), "tiny@1", None))
    int8 = load_model(target, task="causal-lm", device=CPU)
    figures = quality_check(tiny_lm, int8, CheckSize(prompts=6, sentences=8, new_tokens=3))
    assert figures is not None
    # Prompts longer than the tiny model's 64-token context fail on both sides and are left out of the count.
    assert 1 <= figures["check"]["prompts"] <= 6 and figures["check"]["sentences"] == 8
    for share in ("greedy_agreement", "greedy_prefix_agreement", "prediction_agreement"):
        assert 0.0 <= figures[share] <= 1.0
    change = 100 * (figures["zero_shot_accuracy_int8"] - figures["zero_shot_accuracy_fp32"])
    assert figures["accuracy_change_points"] == pytest.approx(change)
    # A check told to stop gives no figures.
    assert quality_check(tiny_lm, int8, CheckSize(prompts=1, sentences=2), should_stop=lambda: True) is None


def test_the_check_refuses_more_than_two_points_lost() -> None:
    def zero_shot(before: float, after: float) -> dict:
        change = round(100 * (after - before), 2)
        return {
            "check": {"sentences": 200},
            "zero_shot_accuracy_fp32": before,
            "zero_shot_accuracy_int8": after,
            "accuracy_change_points": change,
            "prediction_agreement": 0.5,
        }

    assert refusal(zero_shot(0.83, 0.81)) is None  # exactly 2 points: allowed
    assert "fell from 83.0% (fp32) to 80.5% (int8), 2.5 points" in (refusal(zero_shot(0.83, 0.805)) or "")
    assert refusal(zero_shot(0.80, 0.85)) is None  # a gain, whatever the agreement
    head = {"check": {"sentences": 200}, "prediction_agreement": 0.975}
    assert "disagrees with fp32 on 2.5%" in (refusal(head) or "")
    assert refusal({**head, "prediction_agreement": 0.98}) is None
