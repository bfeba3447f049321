"""The failover's steps, in one table, and the failover as a pipeline the engine runs.

`Recovery.Status`, the engine (`recovery.engine`), the recovery pages and the
API all read `FAILOVER_STEPS`; the handlers are in `recovery/steps.py`.
"""

from datetime import timedelta

from reclo_site.errors import Code

from .pipeline import Pipeline, Step, StepTable

FAILOVER_STEPS = StepTable(
    Step(
        name="consolidating",
        title="Preparing the disk",
        handler="recovery.steps.consolidate",
        deadline=timedelta(hours=12),
        error_code=Code.IMPORT_FAILED,
    ),
    Step(
        name="importing",
        title="Creating the cloud image",
        handler="recovery.steps.import_image",
        deadline=timedelta(hours=12),  # VM Import of a large disk takes hours
        error_code=Code.IMPORT_FAILED,
    ),
    Step(
        name="launching",
        title="Starting the server",
        handler="recovery.steps.launch",
        deadline=timedelta(minutes=30),
        error_code=Code.LAUNCH_FAILED,
    ),
    Step(
        name="provisioning_vpn",
        title="Setting up the VPN",
        handler="recovery.steps.provision_vpn",
        deadline=timedelta(minutes=30),
        error_code=Code.VPN_FAILED,
        label="provisioning VPN",
    ),
)

FAILOVER = Pipeline(
    name="failover",
    model="recovery.Recovery",
    step_model="recovery.RecoveryStep",
    run_field="recovery",
    steps=FAILOVER_STEPS,
    task="recovery.tasks.failover_step_run",
    queued="queued",
    succeeded="ready",
    failed="failed",
    on_exit="recovery.notify.failover_finished",  # the owner's email: ready, or failed and why
    select_related=("backup", "server", "user"),
    lease_setting="RECLO_RECOVERY_STALE_AFTER",
)
