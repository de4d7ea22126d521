"""Which prompts a prefill computes together, and what they share: pure Python, so plans are testable alone.

On one CPU thread a prefill costs the same per position at 11 or 8,000 positions (SmolLM2: 2.6-2.8 ms), so the
positions are the whole cost: padding is waste, and so is computing twice what prompts share (a chat template's
system prompt; one document asked several questions).
"""

from __future__ import annotations

from collections.abc import Sequence

# Shared prefixes shorter than this are not worth a forward pass of their own (one more call, at one row).
MIN_SHARED_PREFIX = 4


def shared_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens all ``prompts`` begin with, when worth computing once; every prompt keeps a token to predict from."""
    if len(prompts) < 2:
        return 0
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefill_groups(
    prompts: Sequence[Sequence[int]], shared: int, *, own_prefixes: bool = True, tolerance: float = 0.1
) -> list[tuple[list[int], int]]:
    """Positions into ``prompts`` grouped for prefill, longest first, each with the prefix its members share
    (at least ``shared``, which every prompt shares and is computed already).

    A group computes its rows x (its longest prompt - its prefix) positions, plus its own prefix beyond ``shared``
    once. A prompt joins the group before it unless the group's padding would pass ``tolerance`` of its positions
    beyond ``shared``, or joining would cost more than the prompt padded to the group's width (a shorter prefix
    for all): so padding stays small, and prompts that share more than ``shared`` (a document asked several
    questions) stay together.
    """
    groups: list[tuple[list[int], int]] = []
    first: Sequence[int] = ()
    common = 0  # what the current group's prompts share, before capping
    padding = 0

    def prefix(members: list[int], common: int) -> int:
        capped = min(common, min(len(prompts[m]) for m in members) - 1) if own_prefixes else shared
        return capped if capped - shared >= MIN_SHARED_PREFIX else shared

    def cost(members: list[int], own: int) -> int:
        return len(members) * (len(prompts[members[0]]) - own) + own - shared

    for position in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        prompt = prompts[position]
        if groups:
            members, own = groups[-1]
            width = len(prompts[members[0]])
            joined = [*members, position]
            joined_common = min(common, common_prefix([first, prompt]))
            joined_own = prefix(joined, joined_common)
            joined_padding = padding + width - len(prompt)
            if (
                joined_padding <= tolerance * len(joined) * (width - shared)
                and cost(joined, joined_own) - cost(members, own) <= width - shared
            ):
                groups[-1] = (joined, joined_own)
                common, padding = joined_common, joined_padding
                continue
        groups.append(([position], shared))
        first, common, padding = prompt, len(prompt), 0
    return groups


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        same = 0
        while same < length and other[same] == first[same]:
            same += 1
        length = same
    return length
