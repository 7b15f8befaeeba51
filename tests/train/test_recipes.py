"""The full-size recipes against the checkpoints they name.

``recipes/deepseek_v3.toml`` and ``recipes/qwen3_30b_a3b.toml`` restate their model's
architecture in ``[model]`` so that ``r1fast plan`` can size a run before any weights exist; with
``run.init_from`` set, a field that differs from the checkpoint's config.json stops the run.
``tests/fixtures/hf_configs/`` holds the config.json files published with DeepSeek-V3-Base and
Qwen3-30B-A3B-Base (no weights), so a recipe field that the real checkpoint contradicts fails
here, not on the cluster.
"""
import json
import shutil
from pathlib import Path

import pytest

from r1fast.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_configs"
RECIPES = {"deepseek_v3.toml": "deepseek_v3_base.json",
           "qwen3_30b_a3b.toml": "qwen3_30b_a3b_base.json"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loads_over_its_published_checkpoint_config(recipe, tmp_path):
    """The recipe starts from the checkpoint it names, and the architecture it plans without
    that checkpoint is the checkpoint's (as transformers would see it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(FIXTURES / RECIPES[recipe], folder / "config.json")
    path = ROOT / "recipes" / recipe
    planned = load_train_config(str(path), [])
    started = load_train_config(str(path), [f"--run.init_from={folder}"])
    assert planned.model.to_hf_config() == started.model.to_hf_config()
    published = json.loads((FIXTURES / RECIPES[recipe]).read_text())
    m = started.model
    experts = published.get("n_routed_experts", published.get("num_experts"))
    assert (m.num_layers, m.hidden_size, m.vocab_size, m.num_experts, m.moe_router_topk,
            m.max_position_embeddings) == (
        published["num_hidden_layers"], published["hidden_size"], published["vocab_size"],
        experts, published["num_experts_per_tok"], published["max_position_embeddings"])
