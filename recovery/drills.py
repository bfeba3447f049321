"""The drill's steps, in one table, and the drill as a pipeline the engine runs.

A drill is a test failover: one restore point booted in an isolated sandbox
(`recovery.sandbox`), checked, and torn down whatever happens. `Drill.Status`,
the engine, the drill pages and the API read `DRILL_STEPS`; the handlers and
the teardown (`on_exit`, run after every end: passed, failed, a missed
deadline, a crash, or a worker killed and the reconciler taking over) are in
`recovery/drill_steps.py`.
"""

from datetime import timedelta

from reclo_site.errors import Code

from .pipeline import Pipeline, Step, StepTable

DRILL_STEPS = StepTable(
    Step(
        name="preparing",
        title="Preparing the disk",
        handler="recovery.drill_steps.prepare",
        deadline=timedelta(hours=2),
        error_code=Code.SANDBOX_FAILED,
    ),
    Step(
        name="booting",
        title="Booting in the sandbox",
        # The sandbox's own time limit (RECLO_DRILL_TIME_LIMIT) ends the boot
        # first; this only catches a step that keeps being retried.
        handler="recovery.drill_steps.boot",
        deadline=timedelta(minutes=30),
        error_code=Code.SANDBOX_FAILED,
    ),
    Step(
        name="checking",
        title="Checking the server",
        handler="recovery.drill_steps.check",
        deadline=timedelta(minutes=10),
        error_code=Code.SANDBOX_FAILED,
    ),
)

DRILL = Pipeline(
    name="drill",
    model="recovery.Drill",
    step_model="recovery.DrillStep",
    run_field="drill",
    steps=DRILL_STEPS,
    task="recovery.tasks.drill_step_run",
    queued="queued",
    succeeded="passed",
    failed="failed",
    on_exit="recovery.drill_steps.teardown",
    select_related=("backup", "server", "user"),
    lease_setting="RECLO_DRILL_STALE_AFTER",
)
