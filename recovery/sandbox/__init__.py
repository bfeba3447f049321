"""Drill sandboxes: boot one restore point in isolation, judge it, tear everything down.

The drill pipeline calls this package in three steps::

    from recovery.sandbox import BootRequest, LocalSandbox, SandboxError, materialise_chain
    from reclo_agent.vhd import open_chain, open_seekable

    # 1. preparing: the restore point's chain as a sparse raw file (holes
    #    where no layer stores a block). Time this step yourself.
    chain = open_chain([open_seekable(obj) for obj in stored_objects])
    materialise_chain(chain, work_dir / "disk.raw")

    # 2. booting + checking: one blocking call, bounded by time_limit.
    request = BootRequest(
        evidence_dir=drill_dir,          # console.log and screenshot.png are kept here
        boot_mode="bios",                # or "uefi", as the preflight says
        probe_port=server.drill_probe_port,  # None: no port check
        time_limit=600,                  # seconds from power-on
        label=f"drill-{drill.id}",
    )
    try:
        verdict = LocalSandbox().run(work_dir / "disk.raw", request)
    except SandboxError as exc:          # the sandbox could not start: code 411
        ...

    # 3. record: verdict.passed, verdict.checks ([Check(name, passed,
    #    detail)], as docs/api.md's checks), verdict.reason,
    #    verdict.console_excerpt, verdict.screenshot_path,
    #    verdict.timings ({"prepare", "boot", "checks", "total"} seconds),
    #    verdict.answered_after (power-on to "server answers"), or
    #    verdict.as_dict() for JSON. Then delete disk.raw.

``run`` never leaves anything behind when it returns or raises: QEMU is
stopped, its folder (QMP socket, overlay, firmware variables) removed. If the
worker itself is killed, QEMU dies with it (``PR_SET_PDEATHSIG``) and the
run's lease lets the next ``run`` -- or a periodic ``LocalSandbox().reap()``
-- remove the folder; see :mod:`.local`. The raw file is never written (QEMU
opens it read-only under ``snapshot=on``), so it may be a cached copy.

The ``aws`` sandbox (:mod:`.aws`, ``AwsSandbox``) takes an EC2 image id
instead of a raw file: ``AwsSandbox.prepare(blocks, ...)`` makes that image
from the chain's 512 KiB EBS blocks (the failover's EBS-direct way), and
``run(image_id, request)`` boots it in an isolated subnet and deletes the
instance and network; ``destroy(label)`` deletes everything of a run, the
image too. It is imported from its module (it needs the cloud adapter).

Modules: :mod:`.base` (the interface: :class:`BootRequest`,
:class:`Check`, :class:`Verdict`, :class:`Sandbox`), :mod:`.local` (QEMU),
:mod:`.aws` (EC2),
:mod:`.verdict` (console patterns, the port probe, the checks),
:mod:`.disk` (materialising a chain). The tests' bootable disks come from
:mod:`reclo_site.testing_disks`.
"""

from .base import DEFAULT_TIME_LIMIT, BootRequest, Check, Sandbox, SandboxError, Verdict
from .disk import materialise_chain, write_sparse_raw
from .local import LocalSandbox, accel_works, choose_accel

__all__ = [
    "DEFAULT_TIME_LIMIT",
    "BootRequest",
    "Check",
    "LocalSandbox",
    "Sandbox",
    "SandboxError",
    "Verdict",
    "accel_works",
    "choose_accel",
    "materialise_chain",
    "write_sparse_raw",
]
