"""The adapter library: a directory with a manifest and one PEFT-format adapter dir per adapter.

    <library>/
      loramux-library.json        manifest: format version + one AdapterSpec per adapter (+ the
                                  general adapter's name, when one is set)
      adapters/<name>-<id>/       adapter_config.json + adapter_model.safetensors (PEFT format)
      routers/<name>-<id>/        a trained router (safetensors + json), see save_router
      .lock

The manifest is the single commit point. Every change writes new files into a fresh,
uniquely named adapter dir first, then replaces the manifest atomically (temp file + rename),
and only then deletes what the old manifest referenced. A crash at any moment therefore leaves
the previous or the next state, never a half-written one; unreferenced dirs left by a crash are
reported by `verify` and swept by the next write. A cross-process file lock serialises writers,
so two processes adding at once both land.

A library may name one of its adapters *general* (`set_general`): no router routes to it (they
see `routable()`), and it serves the prompts a router abstains on, instead of the base model
alone (docs/routing.md, section 1). A multi-task LoRA is the natural general adapter.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .._atomic import atomic_write_json, sha256_file, staging_dir
from ..errors import LoramuxError
from .checks import (BASE_ID_KEY, CONFIG_FILE, FINGERPRINT_KEY, WEIGHTS_FILE, PeftFiles, check_against_base,
                     lora_shapes, read_peft_dir)
from .spec import AdapterSpec, TrainingSummary, check_name

if TYPE_CHECKING:
    from peft import PeftModel

    from ..models import BaseModel

MANIFEST = "loramux-library.json"
FORMAT = "loramux-library"
FORMAT_VERSION = 1
_SETTLED_NS = 100_000_000  # `Library._parsed`


class Library:
    """A directory of LoRA adapters for one base model family. See the module docstring."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path).expanduser()
        self._cache: tuple | None = None  # (the manifest's stat key, its parse): `_parsed`
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if not create:
                raise LoramuxError(f"{str(self.path)!r} is not a loramux library (no {MANIFEST}); create one with "
                                   f"`loramux library init {self.path}` or Library(path, create=True)")
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise LoramuxError(f"cannot create a library at {str(self.path)!r}: it exists and is not an empty "
                                   f"directory")
            self.path.mkdir(parents=True, exist_ok=True)
            with self._lock():
                if not manifest.is_file():
                    self._write_manifest({})
        self._read_manifest()  # validates the format now rather than on first use

    # ---------------------------------------------------------------- manifest
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        from filelock import FileLock

        with FileLock(str(self.path / ".lock"), timeout=600):
            yield

    def _read_manifest(self) -> dict[str, AdapterSpec]:
        return self._read_state()[0]

    def _read_state(self) -> tuple[dict[str, AdapterSpec], str | None]:
        """(adapters, the general adapter's name or None), from one read of the manifest. The specs
        are frozen and shared by every read of one manifest (a deep copy per read cost more than
        the parse it saves): their dicts (files, the training config) are never to be changed."""
        adapters, general, _ = self._parsed()
        return dict(adapters), general

    def _read_routers(self) -> dict[str, dict]:
        return copy.deepcopy(self._parsed()[2])

    def _parsed(self) -> tuple[dict[str, AdapterSpec], str | None, dict[str, dict]]:
        """The manifest as it is on disk now, parsed again only when it changed. Every write replaces
        the file by a rename (`atomic_write_json`), so a new manifest is a new inode: its stat tells
        a change made by any process, and a server that reads the library on every request pays a
        stat, not a parse. The specs are shared (frozen); routers are copied per call (`_read_state`,
        `_read_routers`)."""
        path = self.path / MANIFEST
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cache = self._cache  # one read: another thread may replace it
        if cache is not None and cache[0] == key:
            return cache[1]
        # A file's mtime has the kernel's coarse clock (milliseconds; whole seconds on some
        # filesystems); two more writes within one tick could reuse this inode and size. So a
        # manifest younger than a tick is parsed but not kept: once it is older, any later write
        # has a later mtime.
        tick = _SETTLED_NS if st.st_mtime_ns % 1_000_000_000 else 2_000_000_000
        settled = time.time_ns() - st.st_mtime_ns > tick
        # stat before read: a manifest replaced in between is read under the older key, so the
        # next call reads it again rather than keeping stale data under the newer key
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoramuxError(f"library manifest {str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LoramuxError(f"{str(path)!r} is not a loramux library manifest (format {FORMAT!r} expected)")
        if data.get("version", 0) > FORMAT_VERSION:
            raise LoramuxError(f"library {str(self.path)!r} has format version {data['version']}; this loramux "
                               f"reads up to {FORMAT_VERSION}: upgrade loramux")
        adapters = {name: AdapterSpec.from_dict(d) for name, d in data.get("adapters", {}).items()}
        general = data.get("general")
        parsed = (adapters, general if isinstance(general, str) and general in adapters else None,
                  dict(data.get("routers", {})))
        self._cache = (key, parsed) if settled else None
        return parsed

    def _write_manifest(self, adapters: dict[str, AdapterSpec], routers: dict[str, dict] | None = None,
                        general: str | None | bool = True) -> None:
        """Commit a new state. `routers=None` keeps the routers the manifest has now; `general=True`
        keeps the general adapter (dropped when its adapter is gone)."""
        exists = (self.path / MANIFEST).is_file()
        if routers is None:
            routers = self._read_routers() if exists else {}
        if general is True:
            general = self._read_state()[1] if exists else None
        atomic_write_json(self.path / MANIFEST, {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "adapters": {name: spec.to_dict() for name, spec in sorted(adapters.items())},
            "routers": dict(sorted(routers.items())),
            **({"general": general} if general in adapters else {}),
        })

    def _unreferenced(self, adapters: dict[str, AdapterSpec], routers: dict[str, dict]) -> list[Path]:
        """Adapter and router dirs no manifest entry references (left by a crash or a replace)."""
        live = {spec.dir for spec in adapters.values()} | {r["dir"] for r in routers.values()}
        return [d for root in (self.path / "adapters", self.path / "routers") if root.is_dir()
                for d in sorted(root.iterdir()) if d.name not in live]

    def _sweep(self, adapters: dict[str, AdapterSpec]) -> None:
        # Rename before deleting: a reader that read the previous manifest then finds its dir whole
        # or gone (and reads the manifest again), never half-deleted.
        for d in self._unreferenced(adapters, self._read_routers()):
            doomed = d if d.name.startswith(".deleting-") else d.with_name(f".deleting-{d.name}")
            try:
                d.rename(doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def list(self) -> list[AdapterSpec]:
        return list(self._read_manifest().values())

    def names(self) -> list[str]:
        """Every adapter, the general one included."""
        return sorted(self._read_manifest())

    def routable(self) -> list[str]:
        """The adapters routers choose between: every adapter but the general one."""
        return [s.name for s in self.routable_specs()]

    def routable_specs(self) -> list[AdapterSpec]:
        """The specs of `routable()`, in name order: whose tasks routers learn and score against."""
        adapters, general = self._read_state()
        return [spec for name, spec in sorted(adapters.items()) if name != general]

    @property
    def general(self) -> str | None:
        """The adapter that serves prompts a router abstains on; None: the base model serves them."""
        return self._read_state()[1]

    def set_general(self, name: str | None) -> None:
        """Name the general adapter (None: none; abstained prompts go to the base model). A stored
        router that routes to it is refused until retrained without it (`router_dir`)."""
        with self._lock():
            adapters = self._read_manifest()
            if name is not None and name not in adapters:
                raise LoramuxError(f"no adapter named {name!r} in library {str(self.path)!r} to make general; "
                                   f"it has {sorted(adapters)}")
            self._write_manifest(adapters, general=name)

    def __contains__(self, name: str) -> bool:
        return name in self._read_manifest()

    def __len__(self) -> int:
        return len(self._read_manifest())

    def get(self, name: str) -> AdapterSpec:
        adapters = self._read_manifest()
        if name not in adapters:
            raise LoramuxError(f"no adapter named {name!r} in library {str(self.path)!r}; it has {sorted(adapters)}")
        return adapters[name]

    def adapter_dir(self, name: str) -> Path:
        return self.path / "adapters" / self.get(name).dir

    # ---------------------------------------------------------------- writing
    def add(
        self,
        name: str,
        source: "str | Path | PeftModel | PeftFiles",
        *,
        base: "BaseModel",
        tasks: tuple[str, ...] | list[str] = (),
        training: TrainingSummary | None = None,
        replace: bool = False,
    ) -> AdapterSpec:
        """Add an adapter from a PEFT dir or a trained PeftModel, after checking it fits `base`.

        A name already in the library is refused unless `replace=True`; a replace bumps the version.
        """
        check_name(name)
        files = self._files_from(source)
        check_against_base(files, base)
        shapes = lora_shapes(files)
        ranks = {ab["A"][0] for ab in shapes.values()}
        rank = int(files.config.get("r") or max(ranks))
        targets = sorted({m.rsplit(".", 1)[-1] for m in shapes})
        with self._lock():
            adapters = self._read_manifest()
            if name in adapters and not replace:
                raise LoramuxError(f"an adapter named {name!r} is already in library {str(self.path)!r}; "
                                   f"choose another name or remove it first (or pass replace=True / --replace)")
            self._sweep(adapters)
            dir_name = f"{name}-{uuid.uuid4().hex[:8]}"
            with staging_dir(self.path / "adapters" / dir_name) as tmp:
                self._write_peft(tmp, files, base)
                sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            old = adapters.get(name)
            spec = AdapterSpec(
                name=name,
                tasks=tuple(tasks),
                base_model=base.model_id,
                base_fingerprint=base.fingerprint,
                rank=rank,
                alpha=float(files.config.get("lora_alpha", rank)),
                target_modules=tuple(targets),
                files=sums,
                dir=dir_name,
                version=(old.version + 1) if old else 1,
                use_rslora=bool(files.config.get("use_rslora", False)),
                training=training,
                added_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            )
            adapters[name] = spec
            self._write_manifest(adapters)  # the commit point
            self._sweep(adapters)
        return spec

    def remove(self, name: str) -> None:
        with self._lock():
            adapters = self._read_manifest()
            if name not in adapters:
                raise LoramuxError(f"no adapter named {name!r} in library {str(self.path)!r}; it has {sorted(adapters)}")
            del adapters[name]
            self._write_manifest(adapters)
            self._sweep(adapters)

    def export(self, name: str, dest: str | Path) -> Path:
        """Copy an adapter out as a plain PEFT dir (which PeftModel.from_pretrained loads)."""
        src = self.adapter_dir(name)
        self._check_files(self.get(name))
        dest = Path(dest).expanduser()
        if dest.exists():
            raise LoramuxError(f"export destination {str(dest)!r} already exists; choose a new path")
        with staging_dir(dest) as tmp:
            for f in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(src / f, tmp / f)
        return dest

    # ---------------------------------------------------------------- routers
    def save_router(self, name: str, kind: str, adapters: list[str], write: "Callable[[Path], None]") -> Path:
        """Store a trained router beside the adapters; `write(dir)` puts its files into a fresh dir.

        The router records the adapters it was trained for with the sha256 of their weights, so
        `router_dir` refuses it once any of them is replaced or removed. Same commit protocol as
        adapters: staged dir, then the manifest, then the old dir is swept.
        """
        check_name(name)
        with self._lock():
            current = self._read_manifest()
            missing = [a for a in adapters if a not in current]
            if missing:
                raise LoramuxError(f"router {name!r} names adapters {missing} that are not in library "
                                   f"{str(self.path)!r}; it has {sorted(current)}")
            self._sweep(current)
            dir_name = f"{name}-{uuid.uuid4().hex[:8]}"
            with staging_dir(self.path / "routers" / dir_name) as tmp:
                write(tmp)
                sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            routers = self._read_routers()
            routers[name] = {
                "kind": kind,
                "dir": dir_name,
                "files": sums,
                "adapters": {a: current[a].files.get(WEIGHTS_FILE, "") for a in adapters},
                "added_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            self._write_manifest(current, routers)
            self._sweep(current)
        return self.path / "routers" / dir_name

    def routers(self) -> dict[str, dict]:
        """Router name -> its manifest entry (kind, dir, files, the adapters it was trained for)."""
        return self._read_routers()

    def router_dir(self, name: str, *, adapters_may_differ: bool = False) -> Path:
        """The dir of a stored router, after checking its files and that its adapters are unchanged
        (`adapters_may_differ`: files only, for a router read as the start of its retraining)."""
        routers = self._read_routers()
        if name not in routers:
            raise LoramuxError(f"no router named {name!r} in library {str(self.path)!r}; it has {sorted(routers)} "
                               f"(train one with `loramux router train`)")
        entry = routers[name]
        d = self.path / "routers" / entry["dir"]
        self._check_sums(f"router {name!r}", d, entry["files"])
        if adapters_may_differ:
            return d
        adapters, general = self._read_state()
        trained = entry["adapters"]
        removed = sorted(a for a in trained if a not in adapters)
        changed = sorted(a for a in trained if a in adapters and adapters[a].files.get(WEIGHTS_FILE, "") != trained[a])
        added = sorted(a for a in adapters if a not in trained and a != general)  # routers never route to it
        if general in trained:
            raise LoramuxError(f"router {name!r} routes to {general!r}, which the library now names its general "
                               f"adapter (never routed to); retrain it with `loramux router train --library "
                               f"{self.path}`, or unset the general adapter")
        if removed or changed or added:
            raise LoramuxError(
                f"router {name!r} was trained for adapters {sorted(trained)}, but the library changed since "
                f"(removed {removed}, replaced {changed}, added {added}); retrain it with "
                f"`loramux router train --library {self.path}`")
        return d

    def usable_routers(self) -> dict[str, Path]:
        """Stored router name -> its dir, for the routers `router_dir` accepts now (the others were
        trained for adapters the library no longer has as they were, or route to its general one)."""
        usable = {}
        for name in self._read_routers():
            try:
                usable[name] = self.router_dir(name)
            except LoramuxError:
                continue
        return usable

    def remove_router(self, name: str) -> None:
        with self._lock():
            routers = self._read_routers()
            if name not in routers:
                raise LoramuxError(f"no router named {name!r} in library {str(self.path)!r}; it has {sorted(routers)}")
            del routers[name]
            adapters = self._read_manifest()
            self._write_manifest(adapters, routers)
            self._sweep(adapters)

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check_sums(what: str, d: Path, files: dict[str, str]) -> None:
        for fname, expected in files.items():
            f = d / fname
            if not f.is_file():
                raise LoramuxError(f"{what}: file {str(f)!r} is missing from the library")
            actual = sha256_file(f)
            if actual != expected:
                raise LoramuxError(f"{what}: {fname} has sha256 {actual[:12]}..., the manifest "
                                   f"records {expected[:12]}...; the file was changed or corrupted")

    def check_files(self, name: str) -> AdapterSpec:
        """Refuse an adapter whose files are missing or changed since it was added."""
        spec = self.get(name)
        self._check_files(spec)
        return spec

    def _check_files(self, spec: AdapterSpec) -> None:
        self._check_sums(f"adapter {spec.name!r}", self.path / "adapters" / spec.dir, spec.files)

    def verify(self, base: "BaseModel | None" = None) -> list[str]:
        """Check every adapter (files, sha256, safetensors; fit to `base` if given). Returns problems."""
        problems = []
        adapters = self._read_manifest()
        for spec in adapters.values():
            try:
                self._check_files(spec)
                files = read_peft_dir(self.path / "adapters" / spec.dir)
                lora_shapes(files)
                if base is not None:
                    if spec.base_fingerprint != base.fingerprint:
                        raise LoramuxError(f"adapter {spec.name!r} was trained on base fingerprint "
                                           f"{spec.base_fingerprint}, not this base ({base.fingerprint})")
                    check_against_base(files, base)
            except LoramuxError as e:
                problems.append(str(e))
        routers = self._read_routers()
        for name, entry in routers.items():
            try:
                self._check_sums(f"router {name!r}", self.path / "routers" / entry["dir"], entry["files"])
            except LoramuxError as e:
                problems.append(str(e))
        for d in self._unreferenced(adapters, routers):
            problems.append(f"unreferenced dir {str(d)!r} (left by an interrupted write; the next write removes it)")
        return problems

    def check_loadable(self, name: str, base: "BaseModel") -> AdapterSpec:
        """Refuse an adapter trained on another base, or whose files changed since it was added."""
        spec = self.get(name)
        if spec.base_fingerprint != base.fingerprint:
            raise LoramuxError(
                f"adapter {name!r} was trained on base model {spec.base_model!r} (fingerprint "
                f"{spec.base_fingerprint}); the loaded base {base.model_id!r} has fingerprint {base.fingerprint}"
            )
        self._check_files(spec)
        return spec

    def load_peft(self, base: "BaseModel", names: list[str] | str) -> "PeftModel":
        """Wrap `base.model` with PEFT and load the named adapters (the first one active).

        This is the reference path (and what `score` uses until the fused engine exists).
        Refuses adapters trained on another base or whose files changed since they were added.
        """
        from peft import PeftModel

        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise LoramuxError("no adapter names given")
        for name in names:
            self.check_loadable(name, base)
        model = PeftModel.from_pretrained(base.model, self.adapter_dir(names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(self.adapter_dir(name), adapter_name=name)
        model.set_adapter(names[0])
        model.eval()
        return model

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _files_from(source: "str | Path | PeftModel | PeftFiles") -> PeftFiles:
        if isinstance(source, PeftFiles):  # already read (e.g. a Dynamic LoRA's export)
            return source
        if isinstance(source, (str, Path)):
            return read_peft_dir(source)
        from peft import PeftModel, get_peft_model_state_dict

        if not isinstance(source, PeftModel):
            raise LoramuxError(f"cannot add {type(source).__name__}; expected a PEFT adapter dir or a peft.PeftModel")
        name = source.active_adapter
        config = source.peft_config[name].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(source, adapter_name=name).items()}
        return PeftFiles(config=config, tensors=tensors, metadata={}, path=Path(f"<PeftModel adapter {name!r}>"))

    @staticmethod
    def _write_peft(dest: Path, files: PeftFiles, base: "BaseModel") -> None:
        from safetensors.torch import save_file

        config = dict(files.config)
        config["base_model_name_or_path"] = base.model_id
        (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        # The base fingerprint rides inside the safetensors header, so an adapter exported from
        # this library is still recognised as belonging to this base when added elsewhere.
        metadata = {"format": "pt", FINGERPRINT_KEY: base.fingerprint, BASE_ID_KEY: base.model_id}
        save_file({k: v.contiguous() for k, v in files.tensors.items()}, dest / WEIGHTS_FILE, metadata=metadata)
