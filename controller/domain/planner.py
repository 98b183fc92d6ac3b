"""Resolve a broadcast's targets (areas at any level and/or devices) to the devices that play it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from controller.domain.areas import AreaTree
from controller.domain.errors import FieldError


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    id: str
    kind: str
    area_code: str
    address: str
    transport: str
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Targets:
    areas: Sequence[str] = ()
    devices: Sequence[str] = ()


class TargetError(FieldError):
    """A refused input (controller/domain/errors.py)."""


def resolve_targets(
    targets: Targets, tree: AreaTree, devices: Iterable[DeviceEntry], *, kinds: frozenset[str]
) -> list[DeviceEntry]:
    """Devices of `kinds` inside any targeted area's subtree, plus the devices named, each once.

    Raises TargetError naming the field for an unknown area or device, a named device of the wrong
    kind, or a target set that resolves to no device at all.
    """
    if not targets.areas and not targets.devices:
        raise TargetError("targets", "name at least one area or device")
    by_id = {device.id: device for device in devices}
    area_codes: set[str] = set()
    for index, code in enumerate(targets.areas):
        if code not in tree:
            raise TargetError(f"targets.areas[{index}]", f"unknown area {code!r}")
        area_codes.update(tree.subtree_codes(code))
    chosen: dict[str, DeviceEntry] = {}
    for index, device_id in enumerate(targets.devices):
        device = by_id.get(device_id)
        if device is None:
            raise TargetError(f"targets.devices[{index}]", f"unknown device {device_id!r}")
        if device.kind not in kinds:
            raise TargetError(f"targets.devices[{index}]", f"device {device_id!r} is a {device.kind}")
        chosen[device.id] = device
    for device in by_id.values():
        if device.area_code in area_codes and device.kind in kinds and device.enabled:
            chosen.setdefault(device.id, device)
    if not chosen:
        raise TargetError("targets", "the targets resolve to no device")
    return sorted(chosen.values(), key=lambda device: device.id)
