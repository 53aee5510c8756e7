"""A BPF ELF object: described when opened, made live when loaded.

``BpfObject.open(path)`` reads the ELF into a spec (``map_specs``,
``program_specs``) that can still be edited: ``set_map_max_entries`` and
``reuse_map``; a map of maps carries its inner template (``MapSpec.inner``).
``load()`` creates the maps and verifies the programs; the live ``maps`` and
``programs`` are then keyed by their C names, and ``typed_map`` /
``map_of_maps`` give typed handles bound once (the same handle on every call). libbpf's internal
maps for global variables (``.data``, ``.rodata``, ``.bss``, ``.kconfig``) are
not listed: pybpf does not set globals.

Maps declared with ``__uint(pinning, LIBBPF_PIN_BY_NAME)`` are pinned as
``<pin_root>/<name>`` (``/sys/fs/bpf`` by default) on load, or reused when such
a pin exists: that is how several objects and services share one map. An
existing pin whose type, sizes, max_entries or flags differ is refused with an
IncompatibleMapError naming the field.

``close()`` (or leaving the ``with`` block, or garbage collection) frees the
object: its maps and programs stay alive only where pinned, attached or held
by a ``clone()``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pybpf import _libbpf
from pybpf._codec import CType
from pybpf._fd import FdHandle
from pybpf.errors import (
    BpfError,
    IncompatibleMapError,
    VerifierError,
    check,
    describe,
    error_for,
)
from pybpf.map_of_maps import MapOfMaps
from pybpf.maps import Map, MapInfo, MapSpec, MapType, map_info
from pybpf.programs import Program, ProgType

__all__ = ["BpfObject", "MapSpec", "ProgramSpec"]

_PROG_LOG = re.compile(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.DOTALL)
_FAILED_PROG = re.compile(r"prog '([^']+)': BPF program load failed")
_LIBBPF_TAIL_LINES = 8
_COMPARED_FIELDS = ("type", "key_size", "value_size", "max_entries", "flags", "map_extra")


@dataclass(frozen=True)
class ProgramSpec:
    """A program as the object declares it: its name, type and ELF section."""

    name: str
    type: ProgType
    section: str


def _incompatibility(spec: MapSpec, info: MapInfo) -> tuple[str, Any, Any] | None:
    for field in _COMPARED_FIELDS:
        want, have = getattr(spec, field), getattr(info, field)
        if want != have:
            if field == "type":
                want, have = MapType(want).name, MapType(have).name
            return field, want, have
    return None


def _load_error(err: int, obj_name: str, messages: list[str], verb: str = "load") -> BpfError:
    text = "".join(messages)
    log = _PROG_LOG.search(text)
    failed = _FAILED_PROG.search(text)
    if log is not None:
        prog = failed.group(1) if failed else "?"
        return VerifierError(err, f"load program {prog} of object {obj_name}: {describe(err)}", log.group(1))
    tail = [line for line in text.splitlines() if line.strip()][-_LIBBPF_TAIL_LINES:]
    plain = error_for(err, f"{verb} object {obj_name}")
    return type(plain)(err, "\n  ".join([str(plain), *tail]))


class BpfObject:
    """An opened (then loaded) BPF ELF object; a context manager that frees it."""

    def __init__(self, ptr: int, path: str, pin_root: str | None) -> None:
        """Use ``BpfObject.open`` or ``BpfObject.load_file``; this wraps a libbpf pointer."""
        self._ptr: int | None = ptr
        self._finalizer = weakref.finalize(self, _libbpf.bpf_object__close, ptr)
        self.path = path
        self.pin_root = pin_root
        self.name = str(_libbpf.bpf_object__name(ptr).decode())
        self._reused: set[str] = set()
        self._maps: dict[str, Map] | None = None
        self._programs: dict[str, Program] | None = None
        self._inner_specs: dict[str, MapSpec] = {}
        self._bound: dict[tuple[str, CType | None, CType | None], Map] = {}
        self._maps_of_maps: dict[tuple[str, CType | None, CType | None, CType | None], MapOfMaps] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], pin_root: str | os.PathLike[str] | None = None) -> BpfObject:
        """Read an ELF object into an editable spec; raises BpfError (ENOENT, EINVAL...)."""
        opts = _libbpf.new_object_open_opts()
        root = os.fspath(pin_root) if pin_root is not None else None
        if root is not None:
            opts.pin_root_path = os.fsencode(root)
        with _libbpf.capture_output() as messages:
            ptr = _libbpf.bpf_object__open_file(os.fsencode(path), ctypes.byref(opts))
        if not ptr:
            err = _libbpf.get_errno() or errno.EINVAL
            raise _load_error(err, os.fspath(path), messages, verb="open")
        return cls(ptr, os.fspath(path), root)

    @classmethod
    def load_file(cls, path: str | os.PathLike[str], pin_root: str | os.PathLike[str] | None = None) -> BpfObject:
        """``open`` then ``load`` in one step; the object is closed if loading fails."""
        obj = cls.open(path, pin_root)
        try:
            return obj.load()
        except BaseException:
            obj.close()
            raise

    @property
    def _live(self) -> int:
        if self._ptr is None:
            raise ValueError(f"object {self.name} is closed")
        return self._ptr

    @property
    def loaded(self) -> bool:
        return self._maps is not None

    def _iter_ptrs(self, next_fn: Any) -> Iterator[int]:
        ptr = next_fn(self._live, None)
        while ptr:
            yield ptr
            ptr = next_fn(self._live, ptr)

    def _map_ptr(self, name: str) -> int:
        for ptr in self._iter_ptrs(_libbpf.bpf_object__next_map):
            if _libbpf.bpf_map__name(ptr).decode() == name:
                return ptr
        raise KeyError(f"object {self.name} has no map {name!r}")

    def _spec_of(self, ptr: int, inner: MapSpec | None) -> MapSpec:
        pin = _libbpf.bpf_map__pin_path(ptr)
        return MapSpec(
            name=_libbpf.bpf_map__name(ptr).decode(),
            type=MapType(_libbpf.bpf_map__type(ptr)),
            key_size=_libbpf.bpf_map__key_size(ptr),
            value_size=_libbpf.bpf_map__value_size(ptr),
            max_entries=_libbpf.bpf_map__max_entries(ptr),
            flags=_libbpf.bpf_map__map_flags(ptr),
            map_extra=_libbpf.bpf_map__map_extra(ptr),
            pin_path=os.fsdecode(pin) if pin else None,
            inner=inner,
        )

    @property
    def map_specs(self) -> dict[str, MapSpec]:
        """The declared maps (internal ones excluded), reflecting edits made so far.

        A map of maps carries its inner template in ``inner``; libbpf frees the
        template when it loads the object, so the one seen at ``load()`` is kept.
        """
        specs = {}
        for ptr in self._iter_ptrs(_libbpf.bpf_object__next_map):
            if _libbpf.bpf_map__is_internal(ptr):
                continue
            name = _libbpf.bpf_map__name(ptr).decode()
            inner_ptr = _libbpf.bpf_map__inner_map(ptr)
            inner = self._spec_of(inner_ptr, None) if inner_ptr else self._inner_specs.get(name)
            specs[name] = self._spec_of(ptr, inner)
        return specs

    @property
    def program_specs(self) -> dict[str, ProgramSpec]:
        """The declared programs with their types and sections."""
        specs = {}
        for ptr in self._iter_ptrs(_libbpf.bpf_object__next_program):
            name = _libbpf.bpf_program__name(ptr).decode()
            specs[name] = ProgramSpec(
                name=name,
                type=ProgType(_libbpf.bpf_program__type(ptr)),
                section=_libbpf.bpf_program__section_name(ptr).decode(),
            )
        return specs

    def _require_unloaded(self, what: str) -> None:
        if self.loaded:
            raise ValueError(f"{what}: object {self.name} is already loaded")

    def set_map_max_entries(self, name: str, max_entries: int) -> None:
        """Resize a declared map before ``load()``; KeyError for an unknown map."""
        self._require_unloaded(f"set max_entries of map {name}")
        ptr = self._map_ptr(name)
        check(
            _libbpf.bpf_map__set_max_entries(ptr, max_entries),
            f"set max_entries of map {name}",
        )

    def reuse_map(self, name: str, existing: Map) -> None:
        """Make the declared map ``name`` use ``existing`` instead of creating one.

        Raises IncompatibleMapError when ``existing`` differs from the declaration.
        """
        self._require_unloaded(f"reuse map {name}")
        ptr = self._map_ptr(name)
        spec = self.map_specs[name]
        diff = _incompatibility(spec, existing.info)
        if diff is not None:
            field, want, have = diff
            raise IncompatibleMapError(
                f"reuse map {name} in object {self.name}: the given map has {field} {have}, the object declares {want}",
                field=field,
            )
        check(_libbpf.bpf_map__reuse_fd(ptr, existing.fd), f"reuse map {name}")
        self._reused.add(name)

    def _check_pins(self) -> None:
        for spec in self.map_specs.values():
            if spec.pin_path is None or spec.name in self._reused:
                continue
            if not os.path.exists(spec.pin_path):
                os.makedirs(os.path.dirname(spec.pin_path), exist_ok=True)
                continue
            what = f"load object {self.name}: map {spec.name}"
            try:
                with Map.from_pin(spec.pin_path) as pinned:
                    diff = _incompatibility(spec, pinned.info)
            except BpfError as exc:
                raise IncompatibleMapError(f"{what}: pin {spec.pin_path} is not a usable map: {exc}") from exc
            if diff is not None:
                field, want, have = diff
                raise IncompatibleMapError(
                    f"{what}: the map pinned at {spec.pin_path} has {field} {have}, "
                    f"the object declares {want}; remove the pin or align the declarations",
                    field=field,
                )

    def load(self) -> BpfObject:
        """Create maps, load programs; return self.

        Raises VerifierError (with the verifier's log) when a program is refused,
        IncompatibleMapError for a mismatched pin, BpfError otherwise.
        """
        self._require_unloaded("load")
        self._check_pins()
        self._inner_specs = {name: spec.inner for name, spec in self.map_specs.items() if spec.inner is not None}
        with _libbpf.capture_output() as messages:
            ret = _libbpf.bpf_object__load(self._live)
        if ret < 0:
            raise _load_error(-ret, self.name, messages)
        maps: dict[str, Map] = {}
        for ptr in self._iter_ptrs(_libbpf.bpf_object__next_map):
            fd = _libbpf.bpf_map__fd(ptr)
            if _libbpf.bpf_map__is_internal(ptr) or fd < 0:
                continue
            name = _libbpf.bpf_map__name(ptr).decode()
            handle = FdHandle(fd, owner=self, what=f"map {name}")
            maps[name] = Map._wrap(handle, map_info(fd), name, None, None)
        programs: dict[str, Program] = {}
        for ptr in self._iter_ptrs(_libbpf.bpf_object__next_program):
            fd = _libbpf.bpf_program__fd(ptr)
            if fd < 0:
                continue
            name = _libbpf.bpf_program__name(ptr).decode()
            handle = FdHandle(fd, owner=self, what=f"program {name}")
            programs[name] = Program._wrap(handle, name)
        self._maps, self._programs = maps, programs
        return self

    @property
    def maps(self) -> dict[str, Map]:
        """Live maps by name (untyped: use ``.typed()``); ValueError before ``load()``."""
        if self._maps is None:
            raise ValueError(f"object {self.name} is not loaded: call load() first")
        return self._maps

    def typed_map(self, name: str, key_type: CType | None, value_type: CType | None) -> Map:
        """The live map ``name`` typed once: the same handle for the same types on every call.

        Bind typed handles when the object is loaded and keep them, instead of
        calling ``maps[name].typed(...)`` on each use. Raises KeyError for an
        unknown map, IncompatibleMapError when a type's size differs from the map's.
        """
        bound = (name, key_type, value_type)
        if bound not in self._bound:
            self._bound[bound] = self._live_map(name).typed(key_type, value_type)
        return self._bound[bound]

    def map_of_maps(
        self,
        name: str,
        key_type: CType | None = ctypes.c_uint32,
        inner_key_type: CType | None = None,
        inner_value_type: CType | None = None,
    ) -> MapOfMaps:
        """The live map of maps ``name`` with the inner template the object declares (cached).

        Raises KeyError for an unknown map, IncompatibleMapError when it is not a
        map of maps or a type does not fit.
        """
        bound = (name, key_type, inner_key_type, inner_value_type)
        if bound not in self._maps_of_maps:
            self._maps_of_maps[bound] = MapOfMaps(
                self._live_map(name),
                self.map_specs[name].inner,
                key_type=key_type,
                inner_key_type=inner_key_type,
                inner_value_type=inner_value_type,
            )
        return self._maps_of_maps[bound]

    def _live_map(self, name: str) -> Map:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"object {self.name} has no map {name!r}") from None

    @property
    def programs(self) -> dict[str, Program]:
        """Live programs by name; ValueError before ``load()``."""
        if self._programs is None:
            raise ValueError(f"object {self.name} is not loaded: call load() first")
        return self._programs

    def close(self) -> None:
        """Free the object; its borrowed Map/Program handles stop working. Idempotent."""
        for map_ in (self._maps or {}).values():
            map_._handle.close()
        for program in (self._programs or {}).values():
            program._handle.close()
        self._bound.clear()
        self._maps_of_maps.clear()
        self._ptr = None
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("loaded" if self.loaded else "opened")
        return f"<BpfObject {self.name} {state}>"
