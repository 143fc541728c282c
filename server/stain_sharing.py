"""The stain-style query before round 1 (run config ``stain-sharing``).

Every training site is asked for the stain statistics of its training images; a site answers
with numbers only where its centre file sets ``share_stain = true`` and declines otherwise.
Each answer is checked (``common.stain.StainStats.from_dict``: a malformed or out-of-range
style is rejected, not pooled); the pool of accepted styles goes to every site in its training
config (``common.stain_sharing.pack_pool``). The run report lists what each site shared, who
declined and whose answer was rejected.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.stain import STYLE_SIZES, StainStats
from server.federation import exchange
from server.replies import error_reason

STAIN_QUERY = "query.stain_stats"


def share_stain_styles(grid: Grid, timeout: float) -> tuple[dict[str, StainStats], dict]:
    """The accepted styles by centre, and the report entry: ``shared`` (centre -> the numbers
    it sent), ``declined`` (centres whose file does not allow sharing, or that have no style)
    and ``rejected`` (node, centre and why: an error code, no reply or an invalid style)."""
    nodes = list(grid.get_node_ids())
    sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                    message_type=STAIN_QUERY) for node in nodes]
    replies = {m.metadata.src_node_id: m for m in exchange(grid, sent, timeout)}
    shared: dict[str, StainStats] = {}
    declined: list[dict] = []
    rejected: list[dict] = []
    for node in nodes:
        reply = replies.get(node)
        if reply is None or reply.has_error():
            rejected.append({"node_id": node, "centre": "?", "reason": (
                error_reason(reply) if reply is not None else "no reply before the timeout")})
            continue
        record = reply.content.config_records.get("config", {})
        centre = str(record.get("centre", "?"))
        if not record.get("share-stain"):
            declined.append({"node_id": node, "centre": centre,
                             "reason": "its centre file does not allow sharing"})
        elif record.get("no-style"):
            declined.append({"node_id": node, "centre": centre,
                             "reason": "too few stained pixels for a stain matrix"})
        elif centre in shared:
            rejected.append({"node_id": node, "centre": centre,
                             "reason": "a second style for the same centre"})
        else:
            try:
                shared[centre] = StainStats.from_dict(
                    {k: v for k, v in record.items() if k in STYLE_SIZES},
                    f"stain statistics of node {node}")
            except (ValueError, TypeError) as error:
                rejected.append({"node_id": node, "centre": centre, "reason": str(error)})
    names = ", ".join(sorted(shared)) or "none"
    print(f"[cytofed] stain styles shared by {len(shared)} of {len(nodes)} sites ({names}); "
          f"{len(declined)} declined, {len(rejected)} rejected", flush=True)
    report = {"shared": {centre: style.to_dict() for centre, style in sorted(shared.items())},
              "declined": declined, "rejected": rejected}
    return shared, report
