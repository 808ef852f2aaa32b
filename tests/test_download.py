"""`mixchat download`, against a fake Hub (monkeypatched API) and a fake local cache: no network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

import quantize.download as qd
from app.cli import main  # mixchat reads HF_HUB_OFFLINE (app/settings.py) and runs `download`
from model.errors import CheckpointError, MixchatError
from quantize.download import download, select_files

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "acme/tiny-mixtral"

HF_REPO = {  # a Mistral-style repo shipping both layouts, pickles and extras
    ".gitattributes": 1_500,
    "README.md": 4_000,
    "config.json": 700,
    "generation_config.json": 120,
    "model-00001-of-00002.safetensors": 3_000_000,
    "model-00002-of-00002.safetensors": 2_000_000,
    "model.safetensors.index.json": 30_000,
    "pytorch_model-00001-of-00002.bin": 3_000_000,
    "pytorch_model-00002-of-00002.bin": 2_000_000,
    "consolidated-00001-of-00002.safetensors": 3_000_000,
    "consolidated-00002-of-00002.safetensors": 2_000_000,
    "params.json": 300,
    "original/consolidated.00.pth": 5_000_000,
    "onnx/model.onnx": 5_000_000,
    "tokenizer.model": 490_000,
    "tokenizer.json": 1_800_000,
    "tokenizer_config.json": 1_500,
    "special_tokens_map.json": 400,
}


def test_select_files_keeps_only_what_inference_needs():
    assert select_files(list(HF_REPO)) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    mistral = ["params.json", "consolidated.safetensors", "tokenizer.model.v3", "README.md"]
    assert select_files(mistral) == [
        "consolidated.safetensors",
        "params.json",
        "tokenizer.model.v3",
    ]
    with pytest.raises(CheckpointError, match="pickle"):
        select_files(["config.json", "pytorch_model.bin", "tokenizer.model"])
    with pytest.raises(CheckpointError, match="no safetensors"):
        select_files(["config.json", "model.gguf"])


def _write_cached(cache: Path, name: str, size: int, repo: str = REPO) -> Path:
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    path = snapshot / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


class FakeHub:
    """model_info + hf_hub_download over an in-memory repo; records what is fetched."""

    def __init__(self, monkeypatch, cache: Path, files: dict[str, int], fail_on: str | None = None):
        self.cache, self.files, self.fail_on = cache, files, fail_on
        self.fetched: list[str] = []
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kw):
        assert files_metadata  # sizes are needed for the total and the disk check
        siblings = [SimpleNamespace(rfilename=n, size=s) for n, s in self.files.items()]
        return SimpleNamespace(sha=COMMIT, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision, cache_dir, tqdm_class, **kw):
        assert revision == COMMIT  # pinned: all files from one commit
        if filename == self.fail_on:
            self.fail_on = None
            raise KeyboardInterrupt
        size = self.files[filename]
        bar = tqdm_class(total=size, initial=0, desc=filename, unit="B")  # as huggingface_hub does
        with bar:
            bar.update(size // 2)
            bar.update_transfer(size)
            bar.set_postfix_str("1 MB/s")
            bar.update(size - size // 2)
        self.fetched.append(filename)
        return str(_write_cached(Path(cache_dir), filename, size, repo_id))


def test_download_fetches_selected_files_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "hub"
    hub = FakeHub(monkeypatch, cache, HF_REPO)
    _write_cached(cache, "config.json", HF_REPO["config.json"])  # already there

    path = download(REPO, cache_dir=cache)
    assert path == cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT
    expected = select_files(list(HF_REPO))
    assert hub.fetched == [f for f in expected if f != "config.json"]
    assert sorted(p.name for p in path.iterdir()) == sorted(expected)
    err = capsys.readouterr().err
    assert f"{REPO} (89abcdef): 9 files, 7.32 MB, 7.32 MB to download" in err

    hub.fetched.clear()
    assert download(REPO, cache_dir=cache, quiet=True) == path
    assert hub.fetched == []  # everything cached: nothing fetched again
    assert capsys.readouterr().err == ""


def test_download_checks_free_disk_first(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub(monkeypatch, tmp_path / "hub", HF_REPO)
    monkeypatch.setattr(qd, "_free_space", lambda path: 1_000_000)
    with pytest.raises(MixchatError, match=r"not enough disk space .* needs 7\.32 MB, 1\.00 MB free"):
        download(REPO, cache_dir=tmp_path / "hub")
    assert hub.fetched == []


def test_interrupted_download_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = FakeHub(monkeypatch, tmp_path / "hub", HF_REPO, fail_on="model.safetensors.index.json")
    assert main(["download", REPO]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    done = list(hub.fetched)
    hub.fetched.clear()
    assert main(["download", REPO, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith(COMMIT) and err == ""
    assert set(hub.fetched).isdisjoint(done)
    assert sorted(done + hub.fetched) == select_files(list(HF_REPO))


def test_offline_resolves_from_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        _write_cached(cache, name, 10)
    (cache / "models--acme--tiny-mixtral" / "refs").mkdir()
    (cache / "models--acme--tiny-mixtral" / "refs" / "main").write_text(COMMIT)

    def no_network(*args, **kwargs):
        raise AssertionError("network used while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert main(["download", REPO]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT)
    assert "HF_HUB_OFFLINE=1" in err

    assert main(["download", "acme/never-downloaded"]) == 1
    assert capsys.readouterr().err == (
        "mixchat: error: acme/never-downloaded is not in the local Hugging Face cache, and "
        "HF_HUB_OFFLINE=1 forbids downloading it (unset HF_HUB_OFFLINE to download)\n"
    )  # our advice, not the hub library's "pass local_files_only=False"


@pytest.mark.parametrize("offline", ["1", ""])
def test_a_local_path_is_not_a_repo_id(tmp_path, monkeypatch, capsys, offline):
    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked about a local path")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(qd, "_offline", lambda: bool(offline))
    local = tmp_path / "my-model"
    local.mkdir()
    assert main(["download", str(local)]) == 1
    assert capsys.readouterr().err == (
        f"mixchat: error: '{local}' is a local path, not a Hugging Face repo id: nothing to "
        f"download (use it as it is: `mixchat ask --model {local}`)\n"
    )
    assert main(["download", "./not/there"]) == 1
    assert capsys.readouterr().err == (
        "mixchat: error: './not/there' is not a Hugging Face repo id (owner/name, e.g. "
        "mistralai/Mixtral-8x7B-Instruct-v0.1)\n"
    )


def test_hub_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def not_found(*args, **kwargs):
        response = SimpleNamespace(headers={}, status_code=404, request=None)
        raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    assert main(["download", "acme/nope"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "mixchat: error: acme/nope: no such repository on the Hugging Face Hub (or it is private: `hf auth login`)\n"
    )

    FakeHub(monkeypatch, tmp_path / "hub", {"config.json": 10, "pytorch_model.bin": 100})
    assert main(["download", "acme/old"]) == 1
    assert "pickle" in capsys.readouterr().err


def test_progress_adapter_counts_bytes():
    """The tqdm stand-in given to hf_hub_download feeds one shared bar, resumed bytes included."""
    advanced = []
    progress = SimpleNamespace(advance=lambda task, n: advanced.append((task, n)))
    bar_class = qd._progress_class(progress, "task")
    with bar_class(total=100, initial=30, desc="model.safetensors") as bar:  # resumed at 30
        bar.update(50)
        bar.update(20)
        bar.update_transfer(70)
        bar.set_postfix_str("fast", refresh=False)
        bar.refresh()
    assert sum(n for _, n in advanced) == 100 and {t for t, _ in advanced} == {"task"}
    assert (bar.n, bar.total) == (100, 100)
