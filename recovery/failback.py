"""The failback's steps, in one table, and the failback as a pipeline the engine runs.

A failback ("Bring it home") turns what the office wrote to its recovered
server in the cloud into a new restore point of that server, so the agent
writes it back onto the repaired hardware: a snapshot of the instance's
root volume, its blocks read back through EBS direct into a VHD in S3
(a full, or a differencing VHD on the failover's restore point holding only
the blocks changed in the cloud), then the same verification as any
upload. `Failback.Status`, the engine, the pages read `FAILBACK_STEPS`; the
handlers are in `recovery/failback_steps.py`, the services in
`recovery/failback_services.py`.
"""

from datetime import timedelta

from reclo_site.errors import Code

from .pipeline import Pipeline, Step, StepTable

FAILBACK_STEPS = StepTable(
    Step(
        name="snapshotting",
        title="Snapshotting the cloud server's disk",
        handler="recovery.failback_steps.snapshot",
        deadline=timedelta(hours=12),  # a first snapshot of a large, busy volume takes hours
        error_code=Code.IMPORT_FAILED,
    ),
    Step(
        name="copying",
        title="Copying the disk into a restore point",
        handler="recovery.failback_steps.copy",
        deadline=timedelta(hours=12),
        error_code=Code.IMPORT_FAILED,
    ),
    Step(
        name="verifying",
        title="Verifying the restore point",
        handler="recovery.failback_steps.verify",
        deadline=timedelta(hours=4),
        error_code=Code.VERIFICATION_FAILED,
    ),
)

FAILBACK = Pipeline(
    name="failback",
    model="recovery.Failback",
    step_model="recovery.FailbackStep",
    run_field="failback",
    steps=FAILBACK_STEPS,
    task="recovery.tasks.failback_step_run",
    queued="queued",
    succeeded="ready",
    failed="failed",
    on_exit="recovery.failback_services.failback_finished",  # the owner's email and the audit event
    select_related=("recovery", "server", "user", "parent"),
    lease_setting="RECLO_RECOVERY_STALE_AFTER",
)
