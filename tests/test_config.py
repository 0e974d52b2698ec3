"""Recipes: every shipped file loads, and every user mistake is one line naming the file and key."""

import dataclasses
from pathlib import Path

import pytest

from vmoe_cli.config import Recipe, dump_recipe, load_recipe, recipe_to_dict
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ModelConfig, MoEConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DIGITS_VIT = RECIPES / "digits-vit.yaml"
DIGITS_VMOE = RECIPES / "digits-vmoe.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(VmoeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_recipes_dir_holds_the_shipped_recipes():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {
        "vmoe-s32-last2",
        "vmoe-h14-every2",
        "vit-s32-paper",
        "digits-vmoe",
        "fmnist-vmoe",
        "digits-vmoe-finetune",
        "vmoe-b16-every2",
        "vit-b16-i21k",
        "vmoe-s32-last2-ft384",
        "vmoe-b16-every2-ft384",
    } <= names
    assert len(names) == 30


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe.model, ModelConfig)
    assert recipe.description
    dense = path.stem.startswith("vit") or path.stem.endswith("-vit")
    assert (recipe.model.moe is None) == dense


def test_paper_and_tiny_recipes_have_the_stated_settings():
    s32 = load_recipe(RECIPES / "vmoe-s32-last2.yaml").model
    assert s32.sizes() == (8, 512, 2048, 8, 32)
    assert s32.moe_layers() == [5, 7]
    assert (s32.moe.num_experts, s32.moe.k, s32.moe.capacity_factor) == (8, 2, 1.05)
    assert (s32.representation_size, s32.moe.expert_dropout) == (512, 0.2)  # the official S/32 config
    train = load_recipe(RECIPES / "vmoe-s32-last2.yaml").train
    assert (train.batch_size, train.epochs, train.lr, train.weight_decay, train.loss) == (
        8192,
        300,
        3e-3,
        0.1,
        "sigmoid",
    )

    h14 = load_recipe(RECIPES / "vmoe-h14-every2.yaml").model
    assert h14.moe.num_experts == 32
    assert h14.moe_layers() == list(range(1, 32, 2))

    digits = load_recipe(DIGITS_VMOE).model
    assert (digits.image_size, digits.channels, digits.num_classes, digits.tokens_per_image) == (8, 1, 10, 17)
    assert digits.moe_layers() == [1, 3]
    assert (digits.moe.num_experts, digits.moe.capacity_factor, digits.moe.group_images) == (4, 1.25, 8)

    fmnist = load_recipe(RECIPES / "fmnist-vmoe.yaml").model
    assert fmnist.moe_layers() == [3, 5]
    conv, conv_dense = (load_recipe(RECIPES / f"fmnist-conv-{name}.yaml") for name in ("vmoe", "vit"))
    every2 = dataclasses.replace(fmnist.moe, layers="every-2", k=1, capacity_factor=1.05, group_images=32)
    assert conv.model == dataclasses.replace(fmnist, stem="conv", gelu="exact", moe=every2)  # and the budget
    assert conv.model.moe_layers() == [1, 3, 5]
    assert conv_dense.model == dataclasses.replace(conv.model, moe=None)
    assert conv.train == conv_dense.train and conv.train.steps == 6400
    conv_ft = load_recipe(RECIPES / "fmnist-conv-vmoe-finetune.yaml").model  # loads conv.model's checkpoints
    assert conv_ft == dataclasses.replace(
        conv.model, image_size=35, moe=dataclasses.replace(conv.model.moe, capacity_factor=1.5)
    )


def test_unknown_key_suggests_the_closest_name(tmp_path: Path):
    path = write(tmp_path, "model:\n  moe:\n    num_expert: 4\n")
    assert error_of(path) == f"{path}: unknown key 'model.moe.num_expert' (did you mean 'num_experts'?)"


def test_unknown_key_without_close_match_lists_the_valid_keys(tmp_path: Path):
    message = error_of(write(tmp_path, "model:\n  zzz: 1\n"))
    assert "unknown key 'model.zzz' (valid keys: variant, image_size," in message


def test_unknown_top_level_key(tmp_path: Path):
    assert "unknown key 'modle' (did you mean 'model'?)" in error_of(write(tmp_path, "modle: {}\n"))


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path):
    path = write(tmp_path, "model:\n  moe:\n    k: two\n")
    assert error_of(path) == f"{path}: model.moe.k must be an integer, got 'two'"


def test_bool_is_not_an_integer(tmp_path: Path):
    assert "model.moe.k must be an integer, got True" in error_of(write(tmp_path, "model:\n  moe:\n    k: true\n"))


def test_floats_accept_ints_and_float_strings(tmp_path: Path):
    path = write(tmp_path, "model:\n  layer_norm_eps: 1e-5\n  moe:\n    capacity_factor: 2\n")
    model = load_recipe(path).model
    assert model.layer_norm_eps == 1e-5
    assert model.moe.capacity_factor == 2.0 and isinstance(model.moe.capacity_factor, float)
    assert "model.dropout must be a finite number, got 'lots'" in error_of(write(tmp_path, "model:\n  dropout: lots\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=nan", "train.lr must be a finite number, got 'nan'"),
        ("train.lr=-.inf", "train.lr must be a finite number, got -inf"),
        ("model.moe.capacity_factor=.inf", "model.moe.capacity_factor must be a finite number or null, got inf"),
        ("train.betas=[0.9, .nan]", "train.betas[1] must be a finite number, got nan"),
        ("train.epochs=1e999", "train.epochs must be a finite number or null, got '1e999'"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_key(override: str, message: str):
    assert error_of(DIGITS_VMOE, (override,)) == f"{DIGITS_VMOE}: {message}"


def test_nan_in_a_recipe_file_is_refused_naming_the_key(tmp_path: Path):
    path = write(tmp_path, f"base: {DIGITS_VMOE}\ndata:\n  std: .NaN\n")
    assert error_of(path) == f"{path}: data.std must be a finite number or a list of finite numbers, got nan"


def test_literal_names_the_allowed_values_and_suggests(tmp_path: Path):
    message = error_of(write(tmp_path, "model:\n  moe:\n    expert_init: independant\n"))
    assert message.endswith(
        "model.moe.expert_init must be one of 'identical', 'independent', got 'independant'"
        " (did you mean 'independent'?)"
    )
    assert "model.pool must be one of 'cls', 'gap', got 'mean'" in error_of(write(tmp_path, "model:\n  pool: mean\n"))


def test_union_of_string_and_list(tmp_path: Path):
    assert load_recipe(write(tmp_path, "model:\n  moe:\n    layers: [1, 5]\n")).model.moe_layers() == [1, 5]
    message = error_of(write(tmp_path, "model:\n  moe:\n    layers: 3.5\n"))
    assert "model.moe.layers must be a string or a list of integers, got 3.5" in message


def test_model_validation_errors_name_the_file(tmp_path: Path):
    path = write(tmp_path, "model:\n  moe:\n    capacity_factor: null\n")
    assert error_of(path).startswith(f"{path}: set exactly one of model.moe.capacity_factor")
    assert "model.moe.k must be between 1 and num_experts=8" in error_of(
        path, ("model.moe.capacity_factor=1", "model.moe.k=9")
    )


def test_missing_model_section(tmp_path: Path):
    assert error_of(write(tmp_path, "description: nothing\n")).endswith("missing key 'model'")


def test_overrides_set_nested_values():
    recipe = load_recipe(
        DIGITS_VMOE, ["model.moe.k=1", "model.moe.bpr=true", "model.moe.layers=[1,3]", "model.pool=gap"]
    )
    assert (recipe.model.moe.k, recipe.model.moe.bpr, recipe.model.moe.layers, recipe.model.pool) == (
        1,
        True,
        [1, 3],
        "gap",
    )
    assert recipe.model.moe.num_experts == 4  # untouched values stay as in the file


def test_override_creates_moe_on_a_dense_recipe():
    assert load_recipe(DIGITS_VIT).model.moe is None
    moe = load_recipe(DIGITS_VIT, ["model.moe.k=1"]).model.moe
    assert moe == MoEConfig(k=1)


def test_override_removes_moe():
    assert load_recipe(DIGITS_VMOE, ["model.moe=null"]).model.moe is None


def test_bad_overrides():
    assert "--set 'model.moe.k'" in error_of(DIGITS_VMOE, ("model.moe.k",))
    assert "unknown key 'model.moe.num_expert' (did you mean 'num_experts'?)" in error_of(
        DIGITS_VMOE, ("model.moe.num_expert=2",)
    )
    assert "model.variant is not a section" in error_of(DIGITS_VMOE, ("model.variant.patch=4",))


def test_missing_file_names_the_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    assert error_of(path).startswith(f"{path}: no such recipe file")


def test_bad_yaml_names_the_file_and_line(tmp_path: Path):
    path = write(tmp_path, "model:\n  variant: [S/16\n  pool: cls\n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid YAML at line")


@pytest.mark.parametrize(("text", "got"), [("", "an empty file"), ("- a\n- b\n", "a list"), ("3\n", "a int")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: the top level must be a mapping (key: value lines), got {got}"


def test_dump_and_load_round_trip(tmp_path: Path):
    recipe = load_recipe(DIGITS_VMOE, ["model.moe.layers=[1,3]", "model.layer_norm_eps=1e-5", "model.moe.bpr=true"])
    path = tmp_path / "config.yaml"
    dump_recipe(recipe, path)
    again = load_recipe(path)
    assert isinstance(again, Recipe)
    assert again == recipe
    assert recipe_to_dict(again)["model"]["moe"]["layers"] == [1, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_data_and_train_sections_fill_nested_dataclasses_and_reject_typos():
    recipe = load_recipe(DIGITS_VMOE, ("data.augment.mixup=0.2", "train.betas=[0.9, 0.95]"))
    assert recipe.data.augment.mixup == 0.2 and recipe.data.augment.flip is False  # defaults kept beside overrides
    assert recipe.train.betas == [0.9, 0.95] and recipe.train.optimizer == "adamw"
    assert "did you mean 'lr'?" in error_of(DIGITS_VMOE, ("train.lrr=1",))
    assert "did you mean 'mixup'?" in error_of(DIGITS_VMOE, ("data.augment.mixups=1",))
    assert "one of 'cosine'" in error_of(DIGITS_VMOE, ("train.schedule=cosin",))
    assert "train.steps or train.epochs" in error_of(DIGITS_VMOE, ("train.steps=null",))
