"""Bad input to `gptoss-mlx convert`: one `Error:` line naming the problem, a non-zero exit, and
no DST (nor a temporary sibling) left behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gptoss_mlx.cli import main
from gptoss_mlx.convert import ConvertError, convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    """A very small checkpoint (2 layers, 1024 tokens) in both layouts, written fresh per test."""
    return write_checkpoint(tmp_path / "ck", tiny_config(vocab_size=1024, num_hidden_layers=2),
                            layout="both", max_shard_bytes=400_000)


def run_convert(src: Path | str, dst: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), *args])
    return result.exit_code, result.output


def assert_refused(src: Path | str, dst: Path, *needles: str) -> str:
    code, out = run_convert(src, dst)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code != 0, out
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")] == []
    return errors[0]


def edit_shard(folder: Path, tensor: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the shard holding `tensor` after `edit` changed its dict; keep the index in step."""
    index_path = folder / INDEX
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][tensor]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def test_missing_shard(small_ckpt: Path, tmp_path: Path) -> None:
    shard = sorted(small_ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_refused(small_ckpt, tmp_path / "out", shard.name, "missing")


def test_missing_tensor(small_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.sinks"
    edit_shard(small_ckpt, name, lambda t: t.pop(name))
    assert_refused(small_ckpt, tmp_path / "out", "missing tensor", name, "BF16[4]")


def test_unexpected_tensor(small_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.sinks"
    edit_shard(small_ckpt, name, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    assert_refused(small_ckpt, tmp_path / "out", "unexpected tensor", "model.extra.weight")


def test_wrong_shape(small_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.router.bias"
    edit_shard(small_ckpt, name, lambda t: t.update({name: torch.zeros(9, dtype=torch.bfloat16)}))
    assert_refused(small_ckpt, tmp_path / "out", name, "BF16[9]", "expected BF16[8]")


def test_wrong_dtype(small_ckpt: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.experts.down_proj_scales"
    edit_shard(small_ckpt, name, lambda t: t.update({name: t[name].to(torch.float32)}))
    assert_refused(small_ckpt, tmp_path / "out", name, "F32[8, 64, 2]", "expected U8[8, 64, 2]")


def test_truncated_file(small_ckpt: Path, tmp_path: Path) -> None:
    shard = sorted(small_ckpt.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_refused(small_ckpt, tmp_path / "out", shard.name, "truncated")


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{" * 32])
def test_corrupt_header(small_ckpt: Path, tmp_path: Path, garbage: bytes) -> None:
    shard = sorted(small_ckpt.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(garbage + data[len(garbage):])
    assert_refused(small_ckpt, tmp_path / "out", shard.name, "corrupt")


def edit_header(shard: Path, tensor: str, field: str, value: object) -> None:
    """Set one field of a tensor's entry in a safetensors header (the data stays as it is)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[tensor][field] = value
    blob = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


@pytest.mark.parametrize("field,value", [
    ("shape", ["a", 64]), ("shape", [None, 64]), ("shape", [1024.5, 64]),
    ("data_offsets", ["0", "10"]), ("dtype", ["BF16"]), ("dtype", None),
])
def test_malformed_header_entry(small_ckpt: Path, tmp_path: Path, field: str,
                                value: object) -> None:
    name = "model.embed_tokens.weight"
    shard = small_ckpt / json.loads((small_ckpt / INDEX).read_text())["weight_map"][name]
    edit_header(shard, name, field, value)
    assert_refused(small_ckpt, tmp_path / "out", shard.name, name)


def test_config_contradicting_tensors(small_ckpt: Path, tmp_path: Path) -> None:
    cfg_path = small_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_local_experts"] = 16
    cfg_path.write_text(json.dumps(cfg))
    assert_refused(small_ckpt, tmp_path / "out", "model.layers.0.mlp.router.weight",
                   "BF16[8, 64]", "expected BF16[16, 64] from config.json")


def test_config_missing_field(small_ckpt: Path, tmp_path: Path) -> None:
    cfg_path = small_ckpt / "original" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["hidden_size"]
    cfg_path.write_text(json.dumps(cfg))
    assert_refused(small_ckpt / "original", tmp_path / "out", "config.json", "hidden_size")


@pytest.mark.parametrize("field,value", [
    ("num_key_value_heads", 0), ("rope_scaling", "yarn"), ("eos_token_id", []),
    ("hidden_size", "64"),
])
def test_config_bad_value(small_ckpt: Path, tmp_path: Path, field: str, value: object) -> None:
    cfg_path = small_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    assert_refused(small_ckpt, tmp_path / "out", "config.json", field)


def test_dst_parent_is_a_file(small_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    code, out = run_convert(small_ckpt, tmp_path / "afile" / "out")
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code != 0 and len(errors) == 1 and "afile" in errors[0], out
    assert (tmp_path / "afile").read_text() == ""


def test_disk_full(small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from gptoss_mlx.convert import safetensors_io

    def full(out, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", out.name)

    monkeypatch.setattr(safetensors_io, "write_all", full)
    assert_refused(small_ckpt, tmp_path / "out", "No space left on device", ".safetensors")


@pytest.mark.parametrize("name,content,needle", [
    ("config.json", b"\xff\xfe{", "not valid JSON"),
    (INDEX, b"\xff\xfe{", "not a safetensors index"),
    (INDEX, b'{"weight_map": {"model.norm.weight": 5}}', "not a safetensors index"),
])
def test_unreadable_json(small_ckpt: Path, tmp_path: Path, name: str, content: bytes,
                         needle: str) -> None:
    (small_ckpt / name).write_bytes(content)
    assert_refused(small_ckpt, tmp_path / "out", name, needle)


def test_original_layout_tampered(small_ckpt: Path, tmp_path: Path) -> None:
    path = small_ckpt / "original" / "model.safetensors"
    tensors = load_file(path)
    tensors["block.1.attn.qkv.weight"] = tensors["block.1.attn.qkv.weight"][:-16]
    save_file(tensors, path)
    assert_refused(small_ckpt / "original", tmp_path / "out", "block.1.attn.qkv.weight",
                   "BF16[112, 64]", "expected BF16[128, 64]")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path / "empty", tmp_path / "out", "no checkpoint found")
    assert_refused(tmp_path / "nowhere", tmp_path / "out", "no such folder")


def test_mlx_folder_is_not_a_source(small_ckpt: Path, tmp_path: Path) -> None:
    convert(small_ckpt, tmp_path / "mlx", progress=False)
    assert_refused(tmp_path / "mlx", tmp_path / "again", "already an MLX folder")


def test_existing_dst_needs_force(small_ckpt: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, out = run_convert(small_ckpt, dst)
    assert code != 0 and "Error:" in out and "--force" in out
    assert (dst / "keep.txt").read_text() == "mine"
    code, out = run_convert(small_ckpt, dst, "--force")
    assert code == 0, out
    assert not (dst / "keep.txt").exists()
    assert (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_force_replaces_a_symlinked_dst(small_ckpt: Path, tmp_path: Path) -> None:
    """--force on a DST that is a link to a folder replaces the link (as `mv` would) and leaves
    the folder it pointed to alone."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(tmp_path / "target")
    code, out = run_convert(small_ckpt, tmp_path / "out", "--force")
    assert code == 0, out
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "target" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out", "target"]


def test_dst_must_not_hold_the_source(small_ckpt: Path) -> None:
    code, out = run_convert(small_ckpt / "original", small_ckpt, "--force")
    assert code != 0 and "must not be or contain the source" in out
    assert (small_ckpt / "original" / "model.safetensors").is_file()


def test_interrupt_leaves_nothing(small_ckpt: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of writing: the temporary folder goes, no DST appears."""
    from gptoss_mlx.convert import safetensors_io

    real = safetensors_io.FileRange.copy_to
    calls = []

    def interrupted(self, out):
        calls.append(self)
        if len(calls) == 20:
            assert any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())
            raise KeyboardInterrupt
        return real(self, out)

    monkeypatch.setattr(safetensors_io.FileRange, "copy_to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(small_ckpt, tmp_path / "out", progress=False)
    assert len(calls) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


SLOW_CONVERT = (  # the CLI, each file range copied with a pause: a conversion to interrupt
    "import sys, time\n"
    "from gptoss_mlx.convert import safetensors_io as s\n"
    "real = s.FileRange.copy_to\n"
    "def slow(self, out):\n"
    "    time.sleep(0.02)\n"
    "    return real(self, out)\n"
    "s.FileRange.copy_to = slow\n"
    "from gptoss_mlx.cli import main\n"
    "main(['convert', sys.argv[1], sys.argv[2]])\n"
)


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("slow") / "ck",
                            tiny_config(num_hidden_layers=8, vocab_size=1024,
                                        num_local_experts=32))


def start_slow_convert(src: Path, dst: Path, **popen: object) -> subprocess.Popen:
    """The convert command in a child process, returned once its partial folder exists."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(dst)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, **popen)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f".{dst.name}.partial-") for p in dst.parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.2)
    return proc


@pytest.mark.parametrize("signame,status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_in_a_real_process(slow_ckpt: Path, tmp_path: Path, signame: str,
                                  status: int) -> None:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) to the command while it converts: no DST,
    no temporary folder, a quiet exit with 128 + the signal number."""
    import signal

    dst = tmp_path / "out"
    proc = start_slow_convert(slow_ckpt, dst)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert b"Aborted!" not in err and b"Traceback" not in err and b"Error" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sighup_ignored_under_nohup(slow_ckpt: Path, tmp_path: Path) -> None:
    """A conversion started with SIGHUP ignored (nohup) keeps it ignored and finishes."""
    import signal

    def ignore_hup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = start_slow_convert(slow_ckpt, tmp_path / "out", preexec_fn=ignore_hup)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_next_conversion_removes_a_killed_ones_partial_folder(slow_ckpt: Path,
                                                              tmp_path: Path) -> None:
    """SIGKILL leaves `.out.partial-PID`; the next conversion into the same parent (any DST
    name) removes it once that process is gone, and keeps the one of a live process."""
    import signal

    proc = start_slow_convert(slow_ckpt, tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert [p.name for p in stale] == [f".out.partial-{proc.pid}"]

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        busy = tmp_path / f".other.partial-{live.pid}"
        busy.mkdir()
        code, out = run_convert(slow_ckpt, tmp_path / "second")
        assert code == 0, out
        assert f"removed {stale[0]}" in out and f"process {proc.pid} is gone" in out
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "second"]
    finally:
        live.kill()
        live.wait()


def test_repo_id_offline_is_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "convert", "openai/gpt-oss-20b", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert "openai/gpt-oss-20b" in errors[0] and "offline" in errors[0]
    assert not (tmp_path / "o").exists()


def test_library_error_type(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="no such folder"):
        convert(tmp_path / "missing", tmp_path / "out")


def test_sigterm_between_the_renames_of_force_waits(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--force renames the old DST aside, then the new folder in: a SIGTERM in between is held
    until both are done, so DST is the complete new folder (then the process ends)."""
    import signal

    from gptoss_mlx.convert import staging

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename_then_signal(self: Path, target: Path) -> Path:
        moved = real_rename(self, target)
        if self == dst:  # the old folder just went aside
            os.kill(os.getpid(), signal.SIGTERM)
        return moved

    monkeypatch.setattr(Path, "rename", rename_then_signal)
    # other threads running (a server's, MLX's) may be the ones the kernel hands the signal to
    done = threading.Event()
    others = [threading.Thread(target=done.wait, daemon=True) for _ in range(4)]
    for thread in others:
        thread.start()
    try:
        with pytest.raises(staging.Terminated) as info:
            with staging.staged_folder(dst, force=True) as tmp:
                (tmp / "new.txt").write_text("new")
    finally:
        done.set()
    assert info.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
