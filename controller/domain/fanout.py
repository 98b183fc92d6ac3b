"""Area fan-out: one command per area topic instead of one per device (docs/protocol.md §1.12).

A speaker follows the `cmd` topics of the areas its programme document lists (its residential group
and every area above it) and says in its state which ones it follows. One `play` published on an
area topic reaches every follower through the broker, so a city-wide alert costs the controller one
publish instead of ten thousand.

An area topic may carry a broadcast only if nobody outside the broadcast could take it:
- every speaker the registry places under the area is a target (a speaker whose programme document
  lists the area follows it, or soon will), and
- every speaker that last said it follows the area is a target (one moved elsewhere follows the old
  area until its new document reaches it).
Targets that do not (yet) say they follow the chosen area get their own command, with the ids the
area command makes them derive (below), so a speaker reached both ways plays once.

Each speaker derives its command id and delivery id from the area command's `id` and its own address
with UUID version 5 (RFC 9562 §5.5), so its reports name a delivery the controller already stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from controller.domain.areas import AreaTree
from controller.domain.programme import DeliveryIds

# An area topic is worth it from this many followers on; below it, direct commands cost the same.
MIN_FOLLOWERS = 2


def area_path(tree: AreaTree, area_code: str) -> list[str]:
    """The areas whose command topics a device placed in `area_code` follows: its own, then upwards."""
    if area_code not in tree:
        return []
    return [area_code, *(area.code for area in tree.ancestors(area_code))]


def area_delivery_ids(fanout_id: str, address: str) -> DeliveryIds:
    """The ids a device derives from an area command (`fanout_id` is its `id`): §1.12."""
    base = uuid.UUID(fanout_id)
    return DeliveryIds(
        delivery_id=str(uuid.uuid5(base, f"delivery:{address}")),
        command_id=str(uuid.uuid5(base, f"command:{address}")),
    )


@dataclass(frozen=True, slots=True)
class FanoutPlan:
    """Which targets an area command reaches (area code → device ids) and which need their own."""

    by_area: Mapping[str, frozenset[str]] = field(default_factory=dict)
    direct: frozenset[str] = frozenset()

    @property
    def covered(self) -> frozenset[str]:
        return frozenset().union(*self.by_area.values()) if self.by_area else frozenset()


def plan_fanout(
    tree: AreaTree,
    targets: Collection[str],
    placed_under: Mapping[str, Collection[str]],
    followers: Mapping[str, Collection[str]],
    within: Collection[str] | None = None,
) -> FanoutPlan:
    """Choose the highest areas whose topic may carry a broadcast to `targets` (device ids), looking
    only inside the subtrees of the area codes `within` (default: the whole tree).

    `placed_under[code]`: the followers-to-be the registry places directly in area `code` (enabled or
    not: a disabled speaker is simply not a target, which keeps the area's topic closed), complete
    for every area inside `within`;
    `followers[code]`: the devices whose latest state says they follow area `code`.
    """
    wanted = frozenset(targets)
    by_area: dict[str, frozenset[str]] = {}
    covered: set[str] = set()
    tops = [tree.get(code) for code in within] if within is not None else list(tree.roots())
    for root in tops:
        # The registry population of each area, its own plus its children's, children first.
        population: dict[str, frozenset[str]] = {}
        subtree = tree.descendants(root.code)
        for area in reversed(subtree):
            members = frozenset(placed_under.get(area.code, ()))
            for child in tree.children(area.code):
                members |= population[child.code]
            population[area.code] = members
        # Top-down, the highest area whose topic may carry it wins; its subtree is then done.
        pending = [root.code]
        while pending:
            code = pending.pop()
            following = frozenset(followers.get(code, ()))
            reach = (following & wanted) - covered
            if population[code] <= wanted and following <= wanted and len(reach) >= MIN_FOLLOWERS:
                by_area[code] = reach
                covered |= reach
                continue
            pending.extend(child.code for child in reversed(tree.children(code)))
    return FanoutPlan(by_area=by_area, direct=wanted - covered)
