import json
import multiprocessing as mp
import shutil

import pytest
import torch

from loramux.errors import LoramuxError
from loramux.library import Library
from loramux.library.library import MANIFEST
from loramux.models import load_base

from .conftest import make_peft_dir


def _logits(model, ids=torch.tensor([[5, 9, 17, 33, 2]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_add_get_list_remove(tiny_base, peft_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    spec = lib.add("alpha", peft_dir, base=tiny_base, tasks=["t1"])
    assert (spec.name, spec.tasks, spec.rank, spec.alpha, spec.version) == ("alpha", ("t1",), 4, 8.0, 1)
    assert spec.target_modules == ("q_proj", "v_proj") and spec.scaling == 2.0
    assert spec.base_fingerprint == tiny_base.fingerprint and spec.base_model == tiny_base.model_id
    assert set(spec.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert lib.names() == ["alpha"] and "alpha" in lib and len(lib) == 1
    assert Library(tmp_path / "lib").get("alpha") == spec  # survives a reopen
    assert lib.verify(tiny_base) == []
    lib.remove("alpha")
    assert lib.names() == [] and not any((tmp_path / "lib" / "adapters").iterdir())


def test_library_adapter_equals_peft_reference(tiny_base, peft_dir, tmp_path):
    from peft import PeftModel

    lib = Library(tmp_path / "lib", create=True)
    lib.add("alpha", peft_dir, base=tiny_base)
    reference = _logits(PeftModel.from_pretrained(load_base(tiny_base.model_id).model, peft_dir))
    ours = _logits(lib.load_peft(tiny_base, "alpha"))
    assert torch.allclose(ours, reference, atol=1e-6)
    assert not torch.allclose(ours, _logits(load_base(tiny_base.model_id).model))  # the adapter does something


def test_add_from_trained_peft_model_and_export_roundtrip(tiny_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_base.model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    expected = _logits(model)
    lib = Library(tmp_path / "lib", create=True)
    lib.add("beta", model, base=tiny_base)
    model.unload()
    out = lib.export("beta", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.allclose(_logits(PeftModel.from_pretrained(load_base(tiny_base.model_id).model, out)), expected, atol=1e-6)
    with pytest.raises(LoramuxError, match="already exists"):
        lib.export("beta", out)


def test_replace_bumps_version_and_collision_is_refused(tiny_base, peft_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    first = lib.add("alpha", peft_dir, base=tiny_base)
    before = (tmp_path / "lib" / MANIFEST).read_text()
    with pytest.raises(LoramuxError, match="an adapter named 'alpha' is already in library"):
        lib.add("alpha", peft_dir, base=tiny_base)
    assert (tmp_path / "lib" / MANIFEST).read_text() == before
    other = make_peft_dir(tiny_base, tmp_path / "other", seed=3)
    second = lib.add("alpha", other, base=tiny_base, replace=True)
    assert second.version == 2 and second.dir != first.dir and second.files != first.files
    assert [d.name for d in (tmp_path / "lib" / "adapters").iterdir()] == [second.dir]


@pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 101])
def test_invalid_names(tiny_base, peft_dir, tmp_path, name):
    with pytest.raises(LoramuxError, match="adapter name .* is not valid"):
        Library(tmp_path / "lib", create=True).add(name, peft_dir, base=tiny_base)


def test_unknown_adapter_lists_names(tiny_base, peft_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    lib.add("alpha", peft_dir, base=tiny_base)
    with pytest.raises(LoramuxError, match=r"no adapter named 'zeta'.*\['alpha'\]"):
        lib.get("zeta")


# ------------------------------------------------------------------ bad input leaves the library unchanged
def _state(lib_path):
    return (lib_path / MANIFEST).read_text(), sorted(p.name for p in (lib_path / "adapters").iterdir())


@pytest.fixture
def lib_with_one(tiny_base, peft_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    lib.add("alpha", peft_dir, base=tiny_base)
    return lib


def test_pickle_bin_is_refused_with_conversion_command(tiny_base, lib_with_one, peft_dir, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(peft_dir / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = _state(lib_with_one.path)
    with pytest.raises(LoramuxError, match=r"(?s)only a pickled adapter_model.bin.*safetensors only.*save_file\(torch.load"):
        lib_with_one.add("pickled", bad, base=tiny_base)
    assert _state(lib_with_one.path) == before


def test_truncated_safetensors(tiny_base, lib_with_one, peft_dir, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(peft_dir, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    before = _state(lib_with_one.path)
    with pytest.raises(LoramuxError, match="corrupted or truncated"):
        lib_with_one.add("trunc", bad, base=tiny_base)
    assert _state(lib_with_one.path) == before


def test_corrupted_file_inside_library_is_detected(tiny_base, lib_with_one):
    weights = lib_with_one.adapter_dir("alpha") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert any("sha256" in p for p in lib_with_one.verify())
    with pytest.raises(LoramuxError, match="has sha256 .* the file was changed or corrupted"):
        lib_with_one.load_peft(tiny_base, "alpha")


def test_adapter_from_another_base_is_refused(tiny_base, other_model_dir, lib_with_one, tmp_path):
    other = load_base(str(other_model_dir))
    # an adapter exported from a library carries its base's fingerprint in the safetensors header
    exported = lib_with_one.export("alpha", tmp_path / "exported")
    other_lib = Library(tmp_path / "other-lib", create=True)
    with pytest.raises(LoramuxError, match=r"was trained on base model .* fingerprint .* Use the base it was trained on"):
        other_lib.add("alpha", exported, base=other)
    assert other_lib.names() == []
    with pytest.raises(LoramuxError, match="was trained on base model .* fingerprint"):
        lib_with_one.load_peft(other, "alpha")
    assert any("trained on base fingerprint" in p for p in lib_with_one.verify(other))


def test_target_modules_the_base_lacks(tiny_base, lib_with_one, peft_dir, tmp_path):
    bad = tmp_path / "bad-targets"
    shutil.copytree(peft_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    before = _state(lib_with_one.path)
    with pytest.raises(LoramuxError, match=r"targets module\(s\) \['c_attn'\] that base model .* lacks"):
        lib_with_one.add("bad", bad, base=tiny_base)
    assert _state(lib_with_one.path) == before


@pytest.mark.parametrize("field, value", [("modules_to_save", ["lm_head"]), ("use_dora", True),
                                          ("trainable_token_indices", [1, 2])])
def test_parts_that_are_not_lora_factors_are_refused_by_name(tiny_base, lib_with_one, peft_dir, tmp_path, field, value):
    bad = tmp_path / "bad-part"
    shutil.copytree(peft_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoramuxError, match=rf"uses \{{'{field}': .*which loramux does not fuse"):
        lib_with_one.add("bad", bad, base=tiny_base)


def test_shapes_that_do_not_fit_the_base(tiny_base, lib_with_one, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = make_peft_dir(tiny_base, tmp_path / "bad-shape")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(LoramuxError, match=r"do not fit the base layer \(in=32, out=32\)"):
        lib_with_one.add("bad", bad, base=tiny_base)


def test_not_a_library(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(LoramuxError, match="is not a loramux library .*`loramux library init"):
        Library(tmp_path / "plain")
    with pytest.raises(LoramuxError, match="exists and is not an empty directory"):
        Library(tmp_path / "plain", create=True)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(LoramuxError, match="is not a loramux library manifest"):
        Library(tmp_path / "fake")
    (tmp_path / "fake" / MANIFEST).write_text("{oops")
    with pytest.raises(LoramuxError, match="not valid JSON"):
        Library(tmp_path / "fake")


# ------------------------------------------------------------------ atomicity and concurrency
def test_crash_mid_write_leaves_previous_state(tiny_base, lib_with_one, monkeypatch, tmp_path):
    import safetensors.torch

    other = make_peft_dir(tiny_base, tmp_path / "other", seed=5)
    before = _state(lib_with_one.path)
    spec_before = lib_with_one.get("alpha")

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing weights")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    for kwargs in ({"name": "beta"}, {"name": "alpha", "replace": True}):
        with pytest.raises(KeyboardInterrupt):
            lib_with_one.add(source=other, base=tiny_base, **kwargs)
        assert _state(lib_with_one.path) == before
    assert lib_with_one.get("alpha") == spec_before and lib_with_one.verify(tiny_base) == []


def test_crash_after_files_before_manifest_is_swept(tiny_base, lib_with_one, monkeypatch, tmp_path):
    import loramux.library.library as library_mod

    other = make_peft_dir(tiny_base, tmp_path / "other", seed=5)
    monkeypatch.setattr(library_mod.Library, "_write_manifest", lambda self, a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        lib_with_one.add("beta", other, base=tiny_base)
    monkeypatch.undo()
    assert lib_with_one.names() == ["alpha"]
    assert any("unreferenced dir" in p for p in lib_with_one.verify())
    lib_with_one.add("gamma", other, base=tiny_base)  # the next write sweeps the leftover
    assert lib_with_one.verify(tiny_base) == []


def _add_in_process(lib_path, model_dir, src, name, queue):
    try:
        from loramux.library import Library
        from loramux.models import load_base

        Library(lib_path).add(name, src, base=load_base(model_dir))
        queue.put((name, "ok"))
    except Exception as e:  # reported to the parent, which asserts on it
        queue.put((name, repr(e)))


def test_two_processes_adding_at_once_both_land(tiny_base, tiny_model_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    sources = [make_peft_dir(tiny_base, tmp_path / f"src{i}", seed=i) for i in range(2)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_add_in_process, args=(lib.path, str(tiny_model_dir), sources[i], f"a{i}", queue))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = dict(queue.get(timeout=5) for _ in procs)
    assert results == {"a0": "ok", "a1": "ok"}
    assert lib.names() == ["a0", "a1"] and lib.verify(tiny_base) == []


def test_replaced_dirs_are_renamed_away_before_they_are_deleted(tiny_base, peft_dir, tmp_path, monkeypatch):
    """A reader holding the previous manifest finds the old dir whole or gone, never half-deleted."""
    import shutil

    lib = Library(tmp_path / "lib", create=True)
    first = lib.add("alpha", peft_dir, base=tiny_base)
    deleted, real = [], shutil.rmtree

    def rmtree(path, *args, **kwargs):
        deleted.append(path.name)
        assert not (tmp_path / "lib" / "adapters" / first.dir).exists()  # gone from its name before any file goes
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    lib.add("alpha", make_peft_dir(tiny_base, tmp_path / "other", seed=3), base=tiny_base, replace=True)
    assert deleted == [f".deleting-{first.dir}"]


def test_the_general_adapter_is_stored_never_routed_and_dropped_with_its_adapter(tiny_base, peft_dir, tmp_path):
    lib = Library(tmp_path / "lib", create=True)
    for n, seed in (("a", 0), ("b", 1), ("all", 2)):
        lib.add(n, make_peft_dir(tiny_base, tmp_path / n, seed=seed), base=tiny_base, tasks=[n] if n != "all" else [])
    assert lib.general is None and lib.routable() == lib.names() == ["a", "all", "b"]
    with pytest.raises(LoramuxError, match="no adapter named 'none' .* to make general"):
        lib.set_general("none")
    lib.save_router("r", "dlp", ["a", "b"], lambda d: (d / "x.json").write_text("{}"))
    with pytest.raises(LoramuxError, match=r"added \['all'\]"):
        lib.router_dir("r")
    lib.set_general("all")
    assert lib.general == "all" and lib.routable() == ["a", "b"] and lib.names() == ["a", "all", "b"]
    assert lib.router_dir("r").is_dir()  # a router over the routable adapters: the general one is not "added"
    lib.add("c", make_peft_dir(tiny_base, tmp_path / "c", seed=3), base=tiny_base, tasks=["c"])
    lib.save_router("r", "dlp", ["a", "b", "c"], lambda d: (d / "x.json").write_text("{}"))
    assert Library(lib.path).general == "all"  # kept by every later write, read back by another reader
    lib.save_router("old", "dlp", ["a", "all", "b", "c"], lambda d: (d / "x.json").write_text("{}"))
    with pytest.raises(LoramuxError, match="routes to 'all', which the library now names its general adapter"):
        lib.router_dir("old")
    lib.remove("all")  # its adapter gone, no general adapter is left named
    assert lib.general is None and "general" not in json.loads((lib.path / MANIFEST).read_text())
    lib.set_general("a")
    lib.set_general(None)
    assert lib.general is None and lib.routable() == ["a", "b", "c"]


def test_a_settled_manifest_is_parsed_once_and_a_change_by_another_writer_is_seen(tiny_base, peft_dir, tmp_path,
                                                                                   monkeypatch):
    import loramux.library.library as library_module

    monkeypatch.setattr(library_module, "_SETTLED_NS", 0)  # every manifest counts as settled at once
    reader, writer = Library(tmp_path / "lib", create=True), Library(tmp_path / "lib")
    writer.add("a", peft_dir, base=tiny_base)
    parses = []
    real = library_module.json.loads
    monkeypatch.setattr(library_module.json, "loads", lambda text: parses.append(1) or real(text))
    assert reader.names() == ["a"] and reader.general is None and reader.routers() == {}
    assert len(parses) == 1  # a server asks on every request: one parse, then a stat per call
    writer.add("b", peft_dir, base=tiny_base)  # another process's write: a new file (atomic rename)
    assert reader.names() == ["a", "b"]
    reader.set_general("b")
    assert writer.general == "b" and reader.routable() == ["a"]


def test_a_manifest_written_just_now_is_read_again(tiny_base, peft_dir, tmp_path, monkeypatch):
    import loramux.library.library as library_module

    lib = Library(tmp_path / "lib", create=True)
    lib.add("a", peft_dir, base=tiny_base)
    parses = []
    real = library_module.json.loads
    monkeypatch.setattr(library_module.json, "loads", lambda text: parses.append(1) or real(text))
    lib.names(), lib.names()
    assert len(parses) == 2  # younger than _SETTLED_NS: a later write in the same clock tick could look alike


def test_what_a_read_returns_is_the_callers_own(tiny_base, peft_dir, tmp_path, monkeypatch):
    import loramux.library.library as library_module

    monkeypatch.setattr(library_module, "_SETTLED_NS", 0)
    lib = Library(tmp_path / "lib", create=True)
    lib.add("a", peft_dir, base=tiny_base)
    lib._read_manifest().pop("a")
    lib.routers()["x"] = {"kind": "dlp"}
    assert lib.names() == ["a"] and lib.routers() == {}
