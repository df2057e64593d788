"""`lomix.hub.pull` through the real huggingface_hub client, against a local hub look-alike."""

from __future__ import annotations

import json

import hubserver
import pytest
import torch
from conftest import build_pair
from hubdata import LLAMA, folder_files, logits, save_mixture, save_peft_adapter

import lomix
import lomix.hub
from lomix.errors import ShapeMismatchError
from lomix.hub import errors


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from hubserver.serve(tmp_path, monkeypatch)


@pytest.fixture
def published(hub, tmp_path):
    """user/mix: v1 (tagged), then v2 on main; a 'dev' branch holding a PEFT adapter instead."""
    v1, model_v1 = save_mixture(tmp_path / "v1", seed=1)
    v2, model_v2 = save_mixture(tmp_path / "v2", seed=2)
    sha1 = hub.commit("user/mix", {**folder_files(v1), "README.md": "# v1\n"}, message="v1")
    hub.tag("user/mix", "v1", sha1)
    sha2 = hub.commit("user/mix", folder_files(v2), message="v2")
    base, _ = build_pair(LLAMA)
    adapter = save_peft_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    hub.commit("user/mix", folder_files(adapter), branch="dev", delete=tuple(folder_files(v1)))
    return {"v1": (v1, model_v1, sha1), "v2": (v2, model_v2, sha2)}


def _cached_partials(hub) -> list:
    return [p for p in hub.cache.rglob("*") if p.name.endswith(".incomplete")]


def test_pull_by_branch_tag_and_commit(hub, published, tmp_path):
    v1, model_v1, sha1 = published["v1"]
    v2, model_v2, sha2 = published["v2"]

    main = lomix.hub.pull("user/mix")
    assert main.kind == "lomix" and main.commit == sha2 and main.source == "user/mix@main"
    assert main.folder.name == sha2 and main.folder.is_relative_to(hub.cache)  # the hub cache's snapshot
    assert folder_files(main.folder) == {**folder_files(v2), "README.md": b"# v1\n"}  # v2 kept v1's README

    tagged = lomix.hub.pull("user/mix@v1", out=tmp_path / "out")
    assert tagged.commit == sha1 and tagged.folder == tmp_path / "out"
    assert tagged.files == ["lomix_config.json", "lomix_model.safetensors", "README.md"]
    assert folder_files(tmp_path / "out") == {**folder_files(v1), "README.md": b"# v1\n"}

    pinned = lomix.hub.pull(f"user/mix@{sha1}")
    assert pinned.commit == sha1 and folder_files(pinned.folder) == folder_files(tmp_path / "out")

    dev = lomix.hub.pull("user/mix@dev")
    assert dev.kind == "peft" and set(dev.files) >= {"adapter_config.json", "adapter_model.safetensors"}

    # what was pulled is the mixture that was published: same outputs as the model that saved it
    fresh = build_pair(LLAMA)[1]
    lomix.hub.load(fresh, f"user/mix@{sha1}")
    torch.testing.assert_close(logits(fresh), logits(model_v1), rtol=0, atol=0)
    assert not torch.equal(logits(fresh), logits(model_v2))


def test_a_pinned_commit_in_the_cache_needs_no_request(hub, published):
    _, _, sha1 = published["v1"]
    lomix.hub.pull(f"user/mix@{sha1}")
    before = len(hub.requests)
    assert lomix.hub.pull(f"user/mix@{sha1}").commit == sha1
    assert len(hub.requests) == before


def test_offline_mode_reuses_the_cache(hub, published, monkeypatch, tmp_path):
    _, _, sha2 = published["v2"]
    online = lomix.hub.pull("user/mix", out=tmp_path / "online")
    hubserver.set_offline(monkeypatch)
    before = len(hub.requests)
    offline = lomix.hub.pull("user/mix", out=tmp_path / "offline")  # the branch resolves through the cache
    assert len(hub.requests) == before
    assert offline.commit == sha2 and folder_files(tmp_path / "offline") == folder_files(tmp_path / "online")
    assert online.files == offline.files

    with pytest.raises(errors.OfflineError) as info:  # never pulled: the message says what to do
        lomix.hub.pull("user/mix@v1")
    message = str(info.value)
    assert "user/mix@v1" in message and "lomix_config.json" in message and "HF_HUB_OFFLINE=1" in message
    assert "local copy" in message and "lomix hub pull ./path/to/folder" in message
    assert len(hub.requests) == before


def test_no_network_falls_back_to_the_cache_then_explains(hub, published, monkeypatch):
    _, _, sha2 = published["v2"]
    lomix.hub.pull("user/mix")
    hub.close()  # connection refused from now on
    assert lomix.hub.pull("user/mix").commit == sha2
    with pytest.raises(errors.OfflineError, match=r"user/other@main: cannot reach http://127\.0\.0\.1:\d+") as info:
        lomix.hub.pull("user/other")
    assert "adapter_config.json" in str(info.value) and "use a local copy instead" in str(info.value)


def test_a_pickle_only_repository_is_refused_before_download(hub, tmp_path):
    base, _ = build_pair(LLAMA)
    adapter = save_peft_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj"])
    pickled = {"adapter_config.json": (adapter / "adapter_config.json").read_bytes(), "adapter_model.bin": b"\x80\x04"}
    hub.commit("user/pickled", pickled)
    with pytest.raises(errors.UnsafeWeightsError) as info:
        lomix.hub.pull("user/pickled", out=tmp_path / "out")
    message = str(info.value)
    assert "user/pickled@main" in message and "adapter_model.bin" in message and "safetensors only" in message
    assert "arbitrary code" in message
    assert not any("/resolve/" in r.path for r in hub.requests)  # nothing was downloaded
    assert not (tmp_path / "out").exists()

    (adapter / "adapter_model.safetensors").unlink()  # the same refusal for a local folder
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.UnsafeWeightsError, match=r"adapter_model\.bin"):
        lomix.hub.pull(adapter)


def test_path_traversal_is_refused(hub, published, tmp_path):
    v1, _, _ = published["v1"]
    hub.commit("user/evil", {**folder_files(v1), "../../../escape.json": b"{}"})
    with pytest.raises(errors.UnsafePathError, match=r"user/evil@main.*'\.\./\.\./\.\./escape\.json'.*'\.\.'"):
        lomix.hub.pull("user/evil", out=tmp_path / "out")
    assert not any("/resolve/" in r.path for r in hub.requests if "evil" in r.path)
    assert not list(tmp_path.parent.rglob("escape.json")) and not (tmp_path / "out").exists()

    hub.commit("user/evil2", {**folder_files(v1), "sub\\..\\..\\x.json": b"{}"})
    with pytest.raises(errors.UnsafePathError, match=r"backslash"):
        lomix.hub.pull("user/evil2")
    requests = len(hub.requests)
    with pytest.raises(errors.UnsafePathError, match=r"subfolder '\.\./user'"):
        lomix.hub.pull("user/mix", subfolder="../user")
    assert len(hub.requests) == requests  # refused before asking the hub
    with pytest.raises(errors.UnsafePathError, match=r"revision '\.\./\.\./refs'"):
        lomix.hub.pull("user/mix@../../refs")  # a revision names a file in the cache (refs/<revision>)
    with pytest.raises(errors.SpecError, match=r"neither an existing folder nor a hub id"):
        lomix.hub.pull("user/../mix")


def test_an_interrupted_download_keeps_the_good_copy(hub, published, tmp_path):
    out = tmp_path / "out"
    lomix.hub.pull("user/mix@v1", out=out)
    good = folder_files(out)
    v3, _ = save_mixture(tmp_path / "v3", seed=3)
    sha3 = hub.commit("user/mix", folder_files(v3), branch="v1-next")
    hub.interrupt("user/mix", "lomix_model.safetensors", after=200)  # drops mid-file, then the retry fails
    with pytest.raises(errors.DownloadError) as info:
        lomix.hub.pull("user/mix@v1-next", out=out)
    message = str(info.value)
    assert "user/mix@v1-next" in message and "lomix_model.safetensors" in message and "did not complete" in message
    assert folder_files(out) == good  # the previous copy, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert _cached_partials(hub) == []
    assert hub.downloads("lomix_model.safetensors") >= 2  # the client did try to resume

    pulled = lomix.hub.pull("user/mix@v1-next", out=out)  # the network is back
    assert pulled.commit == sha3 and folder_files(out) == {**folder_files(v3), "README.md": good["README.md"]}


def test_shape_mismatch_is_refused_before_the_model_is_touched(hub, published, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ShapeMismatchError,
        match=r"^user/mix@main \(commit [0-9a-f]{40}\): .*self_attn\.q_proj\.experts\.A.*\(3, 4, 48\)",
    ):
        lomix.hub.load(wider, "user/mix")
    assert not hasattr(wider, "lomix_state")
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())

    # a repository whose tensors disagree with its own config is refused at pull time
    base, _ = build_pair(LLAMA)
    adapter = save_peft_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    hub.commit("user/lying", {**folder_files(adapter), "adapter_config.json": json.dumps({**config, "r": 8})})
    with pytest.raises(
        ShapeMismatchError, match=r"user/lying@main.*gives module model\.layers\.0\.self_attn\.q_proj rank 8"
    ):
        lomix.hub.pull("user/lying", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_in_subfolders(hub, monkeypatch, tmp_path):
    base, _ = build_pair(LLAMA)
    math = save_peft_adapter(base, tmp_path / "math", seed=1, r=2, target_modules=["q_proj"])
    code = save_peft_adapter(base, tmp_path / "code", seed=2, r=4, target_modules=["v_proj"])
    files = {f"adapters/math/{k}": v for k, v in folder_files(math).items()}
    files.update({f"adapters/code/{k}": v for k, v in folder_files(code).items()})
    hub.commit("user/many", files)
    with pytest.raises(lomix.MissingFileError, match=r"user/many@main \(commit [0-9a-f]{40}\) holds no"):
        lomix.hub.pull("user/many")  # nothing at the top level
    pulled = lomix.hub.pull("user/many", subfolder="adapters/code", out=tmp_path / "out")
    assert pulled.kind == "peft" and pulled.source == "user/many@main (subfolder adapters/code)"
    assert folder_files(tmp_path / "out") == folder_files(code)
    assert set(pulled.info.modules) == {f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)}
    hubserver.set_offline(monkeypatch)
    assert lomix.hub.pull("user/many", subfolder="adapters/code/").info.modules == pulled.info.modules
    with pytest.raises(errors.OfflineError, match=r"adapters/math/lomix_config\.json / adapters/math/adapter_config"):
        lomix.hub.pull("user/many", subfolder="adapters/math")
    local = lomix.hub.pull(tmp_path, subfolder="math")  # a local folder takes a subfolder too
    assert local.folder == math and local.kind == "peft"


def test_private_repository_and_tokens(hub, published, tmp_path, monkeypatch):
    v1, _, _ = published["v1"]
    hub.commit("org/private-mix", folder_files(v1), private=True, token="hf_reader")
    with pytest.raises(errors.NotFoundError) as info:
        lomix.hub.pull("org/private-mix")
    assert "org/private-mix@main" in str(info.value) and "HF_TOKEN" in str(info.value)
    assert lomix.hub.pull("org/private-mix", token="hf_reader").kind == "lomix"
    assert hub.requests[-1].headers.get("authorization") == "Bearer hf_reader"
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    assert lomix.hub.pull("org/private-mix", out=tmp_path / "out").kind == "lomix"


def test_unknown_repository_revision_and_file(hub, published):
    with pytest.raises(errors.NotFoundError, match=r"user/nope@main: repository not found on http://127"):
        lomix.hub.pull("user/nope")
    with pytest.raises(errors.NotFoundError, match=r"user/mix@v9: no such revision"):
        lomix.hub.pull("user/mix@v9")
    with pytest.raises(
        lomix.MissingFileError, match=r"user/mix@main \(subfolder sub\) \(commit [0-9a-f]{40}\) holds no"
    ):
        lomix.hub.pull("user/mix", subfolder="sub")
    with pytest.raises(lomix.MissingFileError, match=r"holds no lomix_config\.json \+ lomix_model\.safetensors"):
        lomix.hub.pull("user/mix@dev", kind="lomix")


def test_local_folders(tmp_path, monkeypatch):
    folder, model = save_mixture(tmp_path / "runs" / "mix", seed=4)
    monkeypatch.chdir(tmp_path)
    for spec in ("./runs/mix", "runs/mix", folder):  # an existing folder wins over a hub id
        pulled = lomix.hub.pull(spec, out=tmp_path / "copy")
        assert pulled.kind == "lomix" and pulled.commit is None
    assert folder_files(tmp_path / "copy") == folder_files(folder)
    fresh = build_pair(LLAMA)[1]
    lomix.hub.load(fresh, "./copy")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    with pytest.raises(lomix.MissingFileError, match=r"no such folder"):
        lomix.hub.pull("./runs/none")
    with pytest.raises(errors.SpecError, match=r"neither an existing folder nor a hub id"):
        lomix.hub.pull("not a spec")
