"""Routers from other packages: the entry-point group ``lomix.routers``, and the "write your own
router" walkthrough of docs/library.md, whose one-file example is installed here as a plugin into
a temporary folder (a module plus a ``.dist-info`` with ``entry_points.txt``) and used by name by
``lomix train`` and by a fresh Python process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

LOMIX = str(Path(sys.executable).parent / "lomix")
ROOT = Path(__file__).resolve().parents[1]


def walkthrough_example() -> str:
    """The complete one-file router of docs/library.md's "Write your own router"."""
    text = (ROOT / "docs" / "library.md").read_text()
    section = text.split("## Write your own router", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    files = [b for b in blocks if b.startswith("# my_router.py\n")]
    assert len(files) == 1, "the walkthrough has one complete file, starting '# my_router.py'"
    return files[0]


def install_plugin(folder: Path, module: str, source: str, entry_points: str) -> dict[str, str]:
    """``module`` as an installed distribution in ``folder``; returns an environment that sees it."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module.replace('_', '-')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd)


def test_an_installed_router_plugin_is_used_by_name(tmp_path):
    plugins = tmp_path / "site"
    plugins.mkdir()
    env = install_plugin(plugins, "my_router", walkthrough_example(), "[lomix.routers]\ncosine = my_router\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "/nonexistent/model"},
                "data": {"train": "train.jsonl"},
                "mixture": {"num_experts": 4},
                "router": {"name": "topk", "k": 2},
            }
        )
    )
    # the command line: validated by name, its fields typed and checked, listed in the help
    dry = run([LOMIX, "train", str(config), "router.name=cosine", "router.temperature=0.2", "--dry-run"], env, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert yaml.safe_load(dry.stdout)["router"] == {"name": "cosine", "temperature": 0.2}
    bad = run([LOMIX, "train", str(config), "router.name=cosine", "router.temperature=0", "--dry-run"], env, tmp_path)
    assert bad.returncode == 2 and "router.temperature: must be > 0, got 0" in bad.stderr
    help_text = " ".join(run([LOMIX, "train", "--help"], env, tmp_path).stdout.replace("│", " ").split())
    assert "router.name=cosine: temperature: softmax temperature" in help_text
    # without the plugin on the path the name is unknown, and the error lists what is there
    missing = run([LOMIX, "train", str(config), "router.name=cosine", "--dry-run"], dict(os.environ), tmp_path)
    assert missing.returncode == 2 and "unknown router 'cosine'" in missing.stderr

    # Python, in fresh processes that never import the plugin: train one step, save; load elsewhere.
    script = textwrap.dedent(
        """
        import json, sys, torch, lomix
        from transformers import LlamaConfig, LlamaForCausalLM

        def base():
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()

        ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
        if sys.argv[1] == "train":
            model = lomix.inject(base(), lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=4,
                                                              router=lomix.router_config("cosine")))
            router = next(layer.router for _, layer in lomix.mixture_layers(model))
            before = router.centroids.detach().clone()
            with torch.no_grad():
                for _, layer in lomix.mixture_layers(model):
                    layer.experts.B.normal_(std=0.2)
            optimizer = torch.optim.AdamW(lomix.parameter_groups(model, lr=1e-2))
            model.train()
            loss = model(input_ids=ids, labels=ids).loss + lomix.aux_loss(model)
            loss.backward()
            optimizer.step()
            model.eval()
            lomix.save(model, sys.argv[2])
            moved = float((router.centroids - before).abs().max())
        else:
            model = lomix.load(base(), sys.argv[2])
            moved = None
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        print(json.dumps({"router": type(next(l for _, l in lomix.mixture_layers(model)).router).__name__,
                          "moved": moved, "logits": logits.flatten()[:16].tolist()}))
        """
    )
    saved = tmp_path / "mixture"
    trained = run([sys.executable, "-c", script, "train", str(saved)], env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    loaded = run([sys.executable, "-c", script, "load", str(saved)], env, tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    first, second = json.loads(trained.stdout), json.loads(loaded.stdout)
    assert first["router"] == second["router"] == "CosineRouter"
    assert first["moved"] > 0  # the centroids trained through the gates
    assert first["logits"] == second["logits"]  # the saved mixture, loaded by name elsewhere


def test_a_broken_plugin_is_named_when_its_router_is_asked_for(tmp_path):
    env = install_plugin(tmp_path, "broken_router", "raise ImportError('no such thing')\n",
                         "[lomix.routers]\nbroken = broken_router\n")  # fmt: skip
    probe = (
        "import lomix\nprint(lomix.available_routers())\n"
        "try:\n    lomix.router_config('broken')\nexcept lomix.ConfigError as exc:\n    print(exc)\n"
    )
    result = run([sys.executable, "-c", probe], env, tmp_path)
    assert result.returncode == 0, result.stderr
    listed, error = result.stdout.splitlines()
    assert "broken" not in listed and "topk" in listed  # the others still work
    assert error.startswith("router.name: the router plugin 'broken' (broken_router) failed to load")
    assert "no such thing" in error
