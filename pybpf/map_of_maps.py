"""Maps of maps (ARRAY_OF_MAPS, HASH_OF_MAPS): whole tables swapped in one update.

A BPF program that looks a key up in the outer map gets the inner map installed
there at that moment; replacing it is one ``bpf_map_update_elem`` on the outer
map, so a program sees the old table or the new one, never a half-written or
empty one. That is how a service replaces a whole list (a deny list generation,
an endpoint's policy, a service's selection table): build a fresh inner map
aside, fill it, then ``swap`` it in.

The kernel accepts an inner map only when it matches the outer map's inner
template in type, key size, value size and flags (and, for arrays without
``BPF_F_INNER_MAP``, max_entries). ``MapOfMaps`` knows the template (from the
object's ``MapSpec.inner``, or from an inner map already installed), creates
inner maps from it, and checks a map before installing it, so a mismatch is an
IncompatibleMapError naming the map and the field rather than a bare EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from pybpf import _libbpf
from pybpf._codec import CType
from pybpf.errors import BpfError, IncompatibleMapError, KeyNotFoundError, check
from pybpf.maps import BPF_F_INNER_MAP, Map, MapInfo, MapSpec, MapType, UpdateFlag

__all__ = ["MapOfMaps"]

_OUTER_TYPES = (MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS)
_ARRAY_TYPES = (MapType.ARRAY, MapType.PERCPU_ARRAY)
_COMPARED = ("type", "key_size", "value_size", "flags")
_Template = MapSpec | MapInfo


def _sizes_fixed(template: _Template) -> bool:
    """Whether the kernel insists that an inner map have the template's max_entries."""
    return template.type in _ARRAY_TYPES and not template.flags & BPF_F_INNER_MAP


class MapOfMaps:
    """An outer map whose values are maps: typed keys, inner maps made from its template.

    Inner maps come back as owned, typed ``Map`` handles (``inner_key_type``,
    ``inner_value_type``); the outer map holds its own reference to each inner
    map it holds, so closing a handle after installing it is the normal thing.
    """

    def __init__(
        self,
        outer: Map,
        inner: _Template | None = None,
        *,
        key_type: CType | None = ctypes.c_uint32,
        inner_key_type: CType | None = None,
        inner_value_type: CType | None = None,
    ) -> None:
        """Wrap ``outer`` (shared, not copied) with the inner template ``inner``.

        Without ``inner`` the template is read, when first needed, from an inner
        map already in ``outer``. Raises IncompatibleMapError when ``outer`` is
        not a map of maps or a type does not fit the template's sizes.
        """
        if outer.type not in _OUTER_TYPES:
            raise IncompatibleMapError(f"map {outer.name} is {outer.type.name}, not a map of maps", field="type")
        self._outer = outer.typed(key_type, ctypes.c_uint32)
        self._inner_key_type = inner_key_type
        self._inner_value_type = inner_value_type
        self._template: _Template | None = inner
        if inner is not None:
            self._check_types(inner)

    def _discover(self) -> MapInfo | None:
        for key in self._outer:
            inner_id = self._outer.lookup(key)
            if inner_id:
                try:
                    with Map.from_id(inner_id) as inner:
                        return inner.info
                except BpfError:
                    continue  # replaced meanwhile; try the next key
        return None

    def _check_types(self, template: _Template) -> None:
        what = f"map {self.name}: inner"
        for ctype, size, field in (
            (self._inner_key_type, template.key_size, "key_size"),
            (self._inner_value_type, template.value_size, "value_size"),
        ):
            if ctype is not None and ctypes.sizeof(ctype) != size:
                raise IncompatibleMapError(
                    f"{what} {field}: {ctype.__name__} is {ctypes.sizeof(ctype)} bytes, the template's is {size}",
                    field=field,
                )

    @property
    def name(self) -> str:
        return self._outer.name

    @property
    def outer(self) -> Map:
        """The outer map, typed (key type, inner map id)."""
        return self._outer

    @property
    def template(self) -> _Template | None:
        """The inner template: a MapSpec from the object, else the MapInfo of an inner map
        already installed (read when first needed), else None."""
        if self._template is None:
            found = self._discover()
            if found is not None:
                self._check_types(found)
                self._template = found
        return self._template

    def _require_template(self, what: str) -> _Template:
        template = self.template
        if template is None:
            raise ValueError(
                f"{what}: the inner template of map {self.name} is unknown "
                "(pass inner=, e.g. the object's map_specs[name].inner, or install a map first)"
            )
        return template

    # ---- making inner maps ----

    def create_inner(self, max_entries: int | None = None, *, name: str = "") -> Map:
        """A new, empty inner map made from the template; an owned, typed handle.

        ``max_entries`` may differ from the template's except for arrays without
        BPF_F_INNER_MAP (IncompatibleMapError). Raises BpfError as ``Map.create``.
        """
        template = self._require_template(f"create inner map of {self.name}")
        size = template.max_entries if max_entries is None else max_entries
        if size != template.max_entries and _sizes_fixed(template):
            raise IncompatibleMapError(
                f"create inner map of {self.name}: its template is an {template.type.name} with max_entries "
                f"{template.max_entries} and no BPF_F_INNER_MAP flag, so max_entries {size} would be refused",
                field="max_entries",
            )
        return Map.create(
            template.type,
            template.key_size,
            template.value_size,
            size,
            flags=template.flags,
            name=name or self.name,
            key_type=self._inner_key_type,
            value_type=self._inner_value_type,
        )

    def new_inner(
        self,
        items: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
        max_entries: int | None = None,
        *,
        name: str = "",
    ) -> Map:
        """``create_inner`` filled with ``items`` in one batch; closed again if filling fails."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        inner = self.create_inner(max_entries, name=name)
        try:
            inner.update_batch([k for k, _ in pairs], [v for _, v in pairs])
        except BaseException:
            inner.close()
            raise
        return inner

    def check_inner(self, inner: Map) -> None:
        """Raise IncompatibleMapError if the kernel would refuse ``inner`` in this map."""
        template = self.template
        if template is None:
            return  # the kernel will judge; its EINVAL is turned into the same error
        what = f"map {inner.name} as inner map of {self.name}"
        for field in _COMPARED:
            want, have = getattr(template, field), getattr(inner.info, field)
            if want != have:
                if field == "type":
                    want, have = MapType(want).name, MapType(have).name
                raise IncompatibleMapError(f"{what}: it has {field} {have}, the template {want}", field=field)
        if _sizes_fixed(template) and inner.max_entries != template.max_entries:
            raise IncompatibleMapError(
                f"{what}: it has max_entries {inner.max_entries}, the template {template.max_entries}",
                field="max_entries",
            )

    # ---- installing, reading, removing ----

    def swap(self, key: Any, inner: Map, flags: UpdateFlag = UpdateFlag.ANY) -> int | None:
        """Install ``inner`` at ``key`` in one atomic update; return the replaced map's id.

        Programs see the previous inner map until this update and ``inner`` from
        then on; the kernel lets programs already running finish (an RCU grace
        period) before the update returns, so afterwards none still reads the
        previous map. That wait (milliseconds) is why ``swap_many`` exists. The id is
        the one read just before the update (exact when this process is the only
        writer); None when ``key`` was empty. Raises IncompatibleMapError for a
        map that does not fit the template, KeyExistsError/KeyNotFoundError with
        NOEXIST/EXIST, MapFullError.
        """
        self.check_inner(inner)
        previous = self.inner_id(key)
        try:
            self._outer.update(key, inner.fd, flags)
        except BpfError as exc:
            raise self._refused(exc, inner) from exc
        return previous

    def swap_many(self, items: Sequence[tuple[Any, Map]]) -> None:
        """``swap`` several keys in one batch syscall (one wait for running programs in all).

        The replaced ids are not read (that would cost one lookup per key). On
        failure the keys before the failing one are already swapped.
        """
        for _, inner in items:
            self.check_inner(inner)
        try:
            self._outer.update_batch([k for k, _ in items], [m.fd for _, m in items])
        except BpfError as exc:
            raise self._refused(exc, None) from exc

    def replace_many_packed(
        self, items: Sequence[tuple[Any, bytes]], *, name: Callable[[Any], str] | None = None
    ) -> None:
        """For each (key, values back to back), a new inner array holding them at 0..n-1, all
        swapped in with one batch (one wait for running programs in all). ``name(key)``
        names each inner map (the kernel keeps 15 characters), else the outer map's name.

        The bulk form of ``replace`` for array templates with BPF_F_INNER_MAP (every
        inner map its own size): no ``Map`` handle per inner map, whose set-up costs
        several times the two syscalls that make and fill one. Raises as ``swap_many``;
        on failure the keys before the failing one may already be swapped.
        """
        template = self._require_template(f"replace inner maps of {self.name}")
        if template.type not in _ARRAY_TYPES or not template.flags & BPF_F_INNER_MAP:
            raise IncompatibleMapError(
                f"replace_many_packed on {self.name}: the inner template must be an array with BPF_F_INNER_MAP",
                field="type",
            )
        vsize = template.value_size
        fds: list[int] = []
        try:
            for key, values in items:
                label = (name(key) if name else self.name)[:15].encode()
                count = len(values) // vsize
                if not count or len(values) % vsize:
                    raise ValueError(f"replace_many_packed on {self.name}: {len(values)} bytes of {vsize}-byte values")
                opts = _libbpf.new_map_create_opts(template.flags)
                fd = check(
                    _libbpf.bpf_map_create(
                        int(template.type), label, template.key_size, vsize, count, ctypes.byref(opts)
                    ),
                    f"create inner map of {self.name}",
                )
                fds.append(fd)
                slots = (ctypes.c_uint32 * count)(*range(count))
                written = ctypes.c_uint32(count)
                batch = _libbpf.new_batch_opts()
                check(
                    _libbpf.bpf_map_update_batch(fd, slots, values, ctypes.byref(written), ctypes.byref(batch)),
                    f"fill inner map of {self.name}",
                )
            try:
                self._outer.update_batch([k for k, _ in items], fds)
            except BpfError as exc:
                raise self._refused(exc, None) from exc
        finally:
            for fd in fds:
                os.close(fd)  # the outer map holds them now

    def replace(
        self,
        key: Any,
        items: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
        max_entries: int | None = None,
        *,
        name: str = "",
    ) -> int | None:
        """Build an inner map holding ``items`` and ``swap`` it in; the replaced map's id."""
        with self.new_inner(items, max_entries, name=name) as inner:
            return self.swap(key, inner)

    def _refused(self, exc: BpfError, inner: Map | None) -> BpfError:
        if exc.errno != errno.EINVAL:
            return exc
        which = f"map {inner.name}" if inner is not None else "a map"
        return IncompatibleMapError(
            f"install {which} in {self.name}: the kernel refused it as an inner map "
            f"(type, key size, value size or flags differ from the inner template): {exc}"
        )

    def inner_id(self, key: Any) -> int | None:
        """The id of the inner map at ``key``, or None."""
        inner_id: int | None = self._outer.lookup(key)
        return inner_id or None

    def get(self, key: Any) -> Map | None:
        """An owned, typed handle on the inner map at ``key``, or None when empty.

        The handle keeps that map alive even after it is swapped out: close it.
        """
        for _ in range(3):  # a swap between reading the id and opening it: read again
            inner_id = self.inner_id(key)
            if inner_id is None:
                return None
            try:
                return Map.from_id(inner_id, key_type=self._inner_key_type, value_type=self._inner_value_type)
            except BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        raise BpfError(errno.EAGAIN, f"open inner map of {self.name} at {key!r}: it keeps being replaced")

    def delete(self, key: Any) -> int:
        """Remove the inner map at ``key``; its id. KeyNotFoundError (naming the map) when empty."""
        inner_id = self.inner_id(key)
        if inner_id is None:
            raise KeyNotFoundError(errno.ENOENT, f"delete from map {self.name}: no inner map at {key!r}")
        self._outer.delete(key)
        return inner_id

    def keys(self) -> Iterator[Any]:
        """Keys that hold an inner map (an ARRAY_OF_MAPS lists only filled slots)."""
        if self._outer.type == MapType.HASH_OF_MAPS:
            yield from self._outer.keys()  # a hash holds no empty keys
            return
        for key in self._outer:
            if self.inner_id(key) is not None:
                yield key

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def __contains__(self, key: Any) -> bool:
        return self.inner_id(key) is not None

    def __repr__(self) -> str:
        return f"<MapOfMaps {self.name} {self._outer.type.name} template={self._template}>"
